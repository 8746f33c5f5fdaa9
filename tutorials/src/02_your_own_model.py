# %% [markdown]
# # 2 · Your own model
#
# **What you will learn**
#
# * the three ways to hand tl_strace a model: a Hugging Face name (online), a local directory
#   (offline), or a TransformerLens model object you built yourself;
# * what the exactness checks verify, and how to run them on your model with `ts.check_model`;
# * what happens — and what to do — when a model is refused;
# * where the legacy `HookedTransformer` (TransformerLens ≤ 3.9) fits in.
#
# Runs offline in well under a minute: we build a small random model on the spot.

# %% [markdown]
# ## 1. A name, a directory, or an object
#
# `ts.load_model(name_or_path)` returns a TransformerLens 4 `TransformerBridge`:
#
# * `"smollm2-135m"` — the bundled model (tutorial 1);
# * a local directory holding `save_pretrained` output of a model and its tokenizer — works offline;
# * a Hugging Face hub name such as `"Qwen/Qwen2-0.5B"` — needs the internet. With
#   `HF_HUB_OFFLINE=1` (as in this notebook) it fails at once with a message saying how to fix it:

# %%
import tl_strace as ts

try:
    ts.load_model("Qwen/Qwen2-0.5B")
except ts.ModelLoadError as e:
    print(e)

# %% [markdown]
# To show the local-directory route, we build a small random Llama-style model with grouped-query
# attention (4 query heads sharing 2 key/value heads), borrow SmolLM2's tokenizer from the bundled
# cache, and save both with `save_pretrained`.

# %%
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

from tl_strace.io.models import bundled_model_dir

ts.load_model("smollm2-135m")  # makes sure the bundled cache (and its tokenizer) exists
tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir("smollm2-135m"))
config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, tie_word_embeddings=True)
torch.manual_seed(0)
hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
model_dir = Path(tempfile.mkdtemp()) / "tiny-llama"
hf_model.save_pretrained(model_dir)
tokenizer.save_pretrained(model_dir)
sorted(p.name for p in model_dir.iterdir())

# %% [markdown]
# Now it loads like any other model, offline, and traces like SmolLM2 did:

# %%
tiny = ts.load_model(str(model_dir))
res = ts.strace(tiny, "The quick brown fox jumps over the lazy", conditions=["only", "random"])
print(res)
res.to_dataframe().pivot(index="size", columns="condition", values="tv").iloc[::4].round(4)

# %% [markdown]
# (A random model's next-token distribution is almost uniform, so every subgraph is close to it in TV;
# the numbers only become interesting on a trained model.)
#
# If you already hold a TransformerLens model object — because your own workflow built it — pass it
# directly: every tl_strace function takes the model you have and returns tensors and results. The
# only requirements are eval mode and no hooks attached while tl_strace runs. Here we wrap the
# in-memory Hugging Face model ourselves:

# %%
from transformer_lens.model_bridge import TransformerBridge

bridge = TransformerBridge.boot_transformers("meta-llama/Llama-3.2-1B", hf_model=hf_model,
                                             tokenizer=AutoTokenizer.from_pretrained(model_dir))
bridge.eval()
ts.strace(bridge, torch.tensor([1, 504, 3575, 282]), sizes=[0.01, 0.1], conditions=["only"]).tv

# %% [markdown]
# (The architecture name only tells TransformerLens which adapter to use; the weights are the ones we
# passed. Inputs may be token tensors, as here, when you have no tokenizer.)
#
# ## 2. The exactness checks
#
# The method is defined by identities, and tl_strace checks them on *your* model and *your* input
# rather than trusting that an architecture behaves:
#
# * **sum of edges** — the edges into every residual-stream node add up to that node (attention node:
#   skip + Σ heads × sources + output bias; MLP node: skip + MLP output), consecutive blocks connect,
#   and the linearised final norm reproduces the model's own;
# * **attention masking works** — zeroing the post-softmax pattern leaves exactly the output bias,
#   so "removing an attention edge" really removes it (a known failure of other pipelines);
# * **the full graph is the model** — a masked forward that keeps every edge gives the model's logits.
#
# `strace` runs the first two on every call. `check_model` runs all three and shows the worst error
# of each:

# %%
import pandas as pd

pd.Series(ts.check_model(tiny, "The quick brown fox jumps over the lazy"), name="max abs error").to_frame()

# %% [markdown]
# ## 3. When a model is refused
#
# Some architectures do not decompose into this graph. GPT-NeoX / Pythia and GPT-J run attention and
# the MLP *in parallel* on the block input, so there is no state "after attention" for the MLP to
# read; tl_strace refuses such a model rather than approximating it:

# %%
neox_config = transformers.GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
neox = TransformerBridge.boot_transformers("EleutherAI/pythia-70m",
                                           hf_model=transformers.AutoModelForCausalLM.from_config(neox_config).eval(),
                                           tokenizer=AutoTokenizer.from_pretrained(model_dir))
try:
    ts.strace(neox.eval(), "The quick brown fox")
except ts.UnsupportedModelError as e:
    print(e)

# %% [markdown]
# Other refusals you may meet, each with the fix in its message: a model in training mode (call
# `model.eval()`), hooks left attached (`model.reset_hooks()`), an input longer than the context, a
# model in half precision whose identities no longer hold to tolerance (`DecompositionError`: load it in
# float32). Every error derives from `ts.StraceError`, and after any failure the model is left exactly
# as it was — no hooks, same settings:

# %%
tiny.train()
try:
    ts.strace(tiny, "The quick brown fox")
except ts.InputError as e:
    print(e)
tiny.eval()
len([name for name, hp in tiny.hook_dict.items() if hp._forward_hooks])

# %% [markdown]
# ## 4. The legacy HookedTransformer
#
# TransformerLens 4 removed `HookedTransformer`, but much of the ecosystem (ACDC, EAP-IG,
# auto-circuit) still needs TransformerLens ≤ 3.9. tl_strace reads only hook points the two share,
# so with TransformerLens 3.9 installed `ts.load_model("smollm2-135m", backend="hooked")` gives a
# `HookedTransformer`, and every function accepts it. Under TransformerLens 4 that request says what
# to install:

# %%
from importlib.metadata import version

print("transformer-lens", version("transformer-lens"))
try:
    ts.load_model("smollm2-135m", backend="hooked")
    print("loaded a HookedTransformer")
except ts.ModelLoadError as e:
    print(e)

# %% [markdown]
# **Next:** tutorial 3 moves from token-level edges to heads and MLPs.
