
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var KCOL = ["#2563eb", "#ea580c", "#6b7280"];   // head, MLP, skip
  var TCOL = ["#2563eb", "#9ca3af", "#ea580c", "#9ca3af"];  // attn, res_attn, mlp, res_mlp
  function el(tag, attrs, parent) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) { if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, String(attrs[k])); }
    if (parent) parent.appendChild(e);
    return e;
  }
  function text(parent, x, y, s, cls, extra) {
    var a = {x: x, y: y};
    if (cls) a["class"] = cls;
    if (extra) for (var k in extra) a[k] = extra[k];
    var t = el("text", a, parent);
    t.textContent = s;
    return t;
  }
  function clamp(x, a, b) { return Math.max(a, Math.min(b, x)); }
  function fmtS(s) {
    if (s >= 0.01) return String(+s.toPrecision(3));
    return s.toExponential(1).replace(".0e", "e");
  }
  function fmt(x) {
    if (x === null || x === undefined || isNaN(x)) return "n/a";
    if (x === 0) return "0";
    var a = Math.abs(x);
    return a >= 0.01 ? x.toFixed(a >= 10 ? 1 : 3) : x.toExponential(2);
  }
  function tok(s) { return s.replace(/\n/g, "\\n").replace(/\t/g, "\\t").replace(/\r/g, "\\r"); }
  function qt(s) { return "'" + tok(s) + "'"; }
  function num(n) { return n.toLocaleString("en-US"); }
  function edges(n) { return num(n) + (n === 1 ? " edge" : " edges"); }  // "1 edge", "2 edges"

  function init(root) {
    root.setAttribute("data-tls-ready", "1");
    var D = JSON.parse(root.querySelector("script.tls-data").textContent);
    var L = D.L, H = D.H, T = D.T, K = D.sizes.length, NH = L * H, C = NH + 2 * L;
    var nAttn = L * H * T * T, nLoc = L * T;
    var tip = root.querySelector(".tls-tip");
    var slider = root.querySelector(".tls-slider");
    var metricSel = root.querySelector(".tls-metric");
    var label = root.querySelector(".tls-sl");
    var state = {k: D.k0, sel: -1, metric: metricSel ? metricSel.value : "w"};

    function kindOf(c) { return c < NH ? 0 : (c < NH + L ? 1 : 2); }
    function layerOf(c) { return c < NH ? Math.floor(c / H) : (c - NH) % L; }
    function compVal(arr, c, k) { var f = D.cf[c]; return k < f ? 0 : arr[c][k - f]; }
    function decode(id) {
      if (id < nAttn) {
        return {type: 0, l: Math.floor(id / (H * T * T)), h: Math.floor(id / (T * T)) % H,
                t: Math.floor(id / T) % T, s: id % T};
      }
      var rel = id - nAttn, loc = rel % nLoc, t = loc % T;
      return {type: 1 + Math.floor(rel / nLoc), l: Math.floor(loc / T), h: -1, t: t, s: t};
    }
    function edgeComp(d) { return d.type === 0 ? d.l * H + d.h : (d.type === 2 ? NH + d.l : NH + L + d.l); }
    function edgeName(d) {
      var tt = qt(D.tokens[d.t]) + " (" + d.t + ")";
      if (d.type === 0) return "L" + d.l + "H" + d.h + " · " + tt + " \u2190 " + qt(D.tokens[d.s]) + " (" + d.s + ")";
      if (d.type === 1) return "L" + d.l + " skip \u2192 attn · " + tt;
      if (d.type === 2) return "MLP" + d.l + " · " + tt;
      return "L" + d.l + " skip \u2192 MLP · " + tt;
    }

    // ---- tooltip (event delegation: every hoverable element carries data-tip = a key into tips)
    var tips = {};
    function showTip(ev) {
      var t = ev.target;
      while (t && t !== root && !(t.getAttribute && t.getAttribute("data-tip"))) t = t.parentNode;
      if (!t || t === root) { tip.style.display = "none"; return; }
      var f = tips[t.getAttribute("data-tip")];
      if (!f) { tip.style.display = "none"; return; }
      tip.textContent = f();
      tip.style.display = "block";
      var r = root.getBoundingClientRect();
      var x = ev.clientX - r.left + 12, y = ev.clientY - r.top + 12;
      if (x + tip.offsetWidth > r.width) x = Math.max(0, ev.clientX - r.left - tip.offsetWidth - 8);
      tip.style.left = x + "px";
      tip.style.top = y + "px";
    }
    root.addEventListener("mousemove", showTip);
    root.addEventListener("mouseleave", function () { tip.style.display = "none"; });

    // ---- component grid: rows = layers (last on top), columns = heads, MLP, skip
    var grid = root.querySelector("svg.tls-grid");
    var cw = clamp(Math.floor(360 / (H + 2)), 12, 30), ch = clamp(Math.floor(440 / L), 7, 20);
    var gx = 46, gy = 30, gap = 6;
    var gW = Math.max(gx + (H + 2) * cw + gap + 10, 300), gH = gy + L * ch + 44;
    grid.setAttribute("width", gW); grid.setAttribute("height", gH);
    grid.setAttribute("viewBox", "0 0 " + gW + " " + gH);
    function colX(c) {
      var k = kindOf(c);
      if (k === 0) return gx + (c % H) * cw;
      return gx + H * cw + gap + (k - 1) * cw;
    }
    function rowY(l) { return gy + (L - 1 - l) * ch; }
    var stepL = Math.ceil(L / 16);
    for (var l = 0; l < L; l++) {
      if (l % stepL === 0 || l === L - 1) text(grid, gx - 5, rowY(l) + ch / 2 + 3, "L" + l, "tls-lab", {"text-anchor": "end"});
    }
    var stepH = Math.ceil(H / 12);
    for (var h = 0; h < H; h++) {
      if (h % stepH === 0) text(grid, gx + h * cw + cw / 2, gy - 6, "H" + h, "tls-lab", {"text-anchor": "middle"});
    }
    text(grid, gx + H * cw + gap + cw / 2, gy - 6, "MLP", "tls-lab", {"text-anchor": "middle"});
    text(grid, gx + H * cw + gap + 1.5 * cw, gy - 18, "skip", "tls-lab", {"text-anchor": "middle"});
    text(grid, gx, gy - 18, "heads", "tls-lab");
    var cells = [];
    for (var c = 0; c < C; c++) {
      var r = el("rect", {x: colX(c) + 0.5, y: rowY(layerOf(c)) + 0.5, width: cw - 1, height: ch - 1,
                          "data-tip": "c" + c, "data-c": c}, grid);
      cells.push(r);
      (function (c) {
        tips["c" + c] = function () {
          var k = state.k, n = compVal(D.cn, c, k);
          var lines = [D.names[c] + (n ? "" : "  (not in the trace at this s)"),
            "s = " + fmtS(D.sizes[k]) + ": " + num(n) + " of " + edges(D.ct[c]),
            "summed edge weight " + fmt(compVal(D.cw, c, k)) + " · flow " + fmt(compVal(D.cfl, c, k)),
            "enters the trace at s = " + (D.cf[c] < K ? fmtS(D.sizes[D.cf[c]]) : "never")];
          if (kindOf(c) < 2) lines.push("click: token-level edges");
          return lines.join("\n");
        };
      })(c);
    }
    var legY = gy + L * ch + 16;
    ["head", "MLP", "skip"].forEach(function (nm, i) {
      el("rect", {x: gx + i * 52, y: legY - 8, width: 10, height: 10, fill: KCOL[i]}, grid);
      text(grid, gx + i * 52 + 13, legY + 1, nm, "tls-lab");
    });
    el("rect", {x: gx + 160, y: legY - 8, width: 10, height: 10, fill: "#fff", stroke: "#111827", "stroke-width": 1.5}, grid);
    text(grid, gx + 173, legY + 1, "enters at this s", "tls-lab");
    text(grid, gx, legY + 16, "intensity: relative to the strongest of its kind", "tls-lab");
    grid.addEventListener("click", function (ev) {
      var c = ev.target.getAttribute && ev.target.getAttribute("data-c");
      if (c === null || c === undefined) return;
      c = +c;
      if (kindOf(c) < 2) { state.sel = c; drawHead(); drawGrid(); }
    });

    function drawGrid() {
      var k = state.k, arr = state.metric === "f" ? D.cfl : (state.metric === "n" ? D.cn : D.cw);
      var mx = [0, 0, 0];
      for (var c = 0; c < C; c++) { var v = compVal(arr, c, k); if (v > mx[kindOf(c)]) mx[kindOf(c)] = v; }
      for (c = 0; c < C; c++) {
        var kd = kindOf(c), v2 = compVal(arr, c, k), r = cells[c], n = compVal(D.cn, c, k);
        if (n > 0) {
          var a = mx[kd] > 0 ? Math.sqrt(Math.max(v2, 0) / mx[kd]) : 1;
          r.setAttribute("fill", KCOL[kd]);
          r.setAttribute("fill-opacity", (0.12 + 0.88 * a).toFixed(3));
          r.setAttribute("stroke", D.cf[c] === k ? "#111827" : "none");
          r.setAttribute("stroke-width", "1.5");
        } else {
          r.setAttribute("fill", "#f8fafc");
          r.setAttribute("fill-opacity", "1");
          r.setAttribute("stroke", "#e5e7eb");
          r.setAttribute("stroke-width", "1");
        }
        if (c === state.sel) { r.setAttribute("stroke", "#7c3aed"); r.setAttribute("stroke-width", "2.5"); }
      }
    }

    // ---- token-level trace: x = token position, y = graph layer (embedding at the bottom)
    var tg = root.querySelector("svg.tls-tg");
    var dx = clamp(Math.floor(700 / T), 6, 28), dy = clamp(Math.floor(440 / (2 * L + 1)), 4, 18);
    var tx = 50, ty = 12;
    function X(t) { return tx + t * dx + dx / 2; }
    function Y(g) { return ty + (2 * L - g) * dy; }
    var tW = tx + T * dx + 10, tH = Y(0) + 70;
    tg.setAttribute("width", tW); tg.setAttribute("height", tH);
    tg.setAttribute("viewBox", "0 0 " + tW + " " + tH);
    text(tg, tx - 6, Y(0) + 3, "emb", "tls-lab", {"text-anchor": "end"});
    for (l = 0; l < L; l++) {
      if (l % stepL === 0 || l === L - 1) text(tg, tx - 6, Y(2 * l + 2) + 3, "L" + l, "tls-lab", {"text-anchor": "end"});
    }
    var stepT = dx >= 9 ? 1 : Math.ceil(9 / dx);
    for (var t = 0; t < T; t++) {
      if (t % stepT !== 0 && t !== T - 1) continue;
      var xt = X(t), yt = Y(0) + 10;
      var lab = text(tg, xt, yt, tok(D.tokens[t]).slice(0, 12), "tls-tok",
                     {transform: "rotate(-60 " + xt + " " + yt + ")", "text-anchor": "end"});
      if (t === T - 1) lab.setAttribute("font-weight", "700");
    }
    var eg = el("g", {}, tg), ng = el("g", {}, tg);
    var E = D.ed.id.length, ng0 = D.ng, dec = [], lines = [];
    var wmax = [0, 0, 0, 0];
    for (var i = 0; i < E; i++) {
      var d = decode(D.ed.id[i]);
      d.k = D.ed.k[i]; d.w = D.ed.w[i]; d.r = D.ed.r[i]; d.c = edgeComp(d);
      dec.push(d);
      if (d.w > wmax[d.type]) wmax[d.type] = d.w;
    }
    function strokeW(d) { return wmax[d.type] > 0 ? 0.5 + 2.5 * Math.sqrt(d.w / wmax[d.type]) : 1; }
    function edgeTip(d) {
      return function () {
        return [edgeName(d), "local weight " + fmt(d.w) + (d.r >= 0 ? " · rank " + num(d.r) : " · not taken by the search"),
                "enters the trace at s = " + fmtS(D.sizes[d.k])].join("\n");
      };
    }
    var nodeFirst = {};
    function touch(g, t, k) { var key = g * T + t; if (!(key in nodeFirst) || k < nodeFirst[key]) nodeFirst[key] = k; }
    for (i = 0; i < ng0; i++) {
      d = dec[i];
      var g0 = (D.P || d.type <= 1) ? 2 * d.l : 2 * d.l + 1, g1 = D.P ? g0 + 2 : g0 + 1;  // parallel: 2l -> 2l+2
      var off = d.type === 0 ? 0 : (d.type === 2 ? 0.22 * dx : -0.22 * dx);
      var x1 = X(d.s) + (d.type === 0 ? 0 : off), x2 = X(d.t) + off;
      var ln = el("line", {x1: x1.toFixed(1), y1: Y(g0).toFixed(1), x2: x2.toFixed(1), y2: Y(g1).toFixed(1),
                           stroke: TCOL[d.type], "stroke-width": strokeW(d).toFixed(2),
                           "stroke-opacity": d.type === 0 ? 0.55 : 0.8, "data-tip": "e" + i}, eg);
      tips["e" + i] = edgeTip(d);
      lines.push(ln);
      touch(g0, d.s, d.k); touch(g1, d.t, d.k);
    }
    var nodes = [];
    Object.keys(nodeFirst).map(Number).sort(function (a, b) { return a - b; }).forEach(function (key) {
      var g = Math.floor(key / T), t = key % T;
      var circ = el("circle", {cx: X(t).toFixed(1), cy: Y(g).toFixed(1), r: g === 0 ? 2.5 : 1.6,
                               fill: g === 0 ? "#7c3aed" : "#374151", "data-tip": "n" + key}, ng);
      nodes.push([circ, nodeFirst[key], g, t]);
      tips["n" + key] = function () {
        var where = g === 0 ? "embedding" : (g % 2 ? "stream after L" + ((g - 1) / 2) + " attention"
                                                   : "stream after L" + (g / 2 - 1) + (D.P ? " (parallel block)" : " MLP"));
        var s = where + " at " + qt(D.tokens[t]) + " (" + t + ")";
        if (g === 0) {
          var tot = 0, row = D.tf[state.k];
          for (var j = 0; j < T; j++) tot += row[j] || 0;
          s += "\nflow reaching this token at s = " + fmtS(D.sizes[state.k]) + ": " + fmt(row[t]) +
               (tot > 0 ? " (" + fmt(100 * row[t] / tot) + "% of what reaches the input)" : "");
        }
        if (g === 2 * L && t === T - 1) s += "\nthe output node";
        return s;
      };
    });
    el("circle", {cx: X(T - 1), cy: Y(2 * L), r: 4.5, fill: "none", stroke: "#7c3aed", "stroke-width": 2}, tg);
    var tgNote = root.querySelector(".tls-tgnote");

    function drawTokens() {
      var k = state.k, shown = 0;
      for (var i = 0; i < lines.length; i++) {
        var vis = dec[i].k <= k;
        lines[i].style.display = vis ? "" : "none";
        if (vis) shown++;
      }
      var tfk = D.tf[k], mxf = 0;
      for (var t = 0; t < T; t++) if (tfk[t] > mxf) mxf = tfk[t];
      nodes.forEach(function (n) {
        var vis = n[1] <= k;
        n[0].style.display = vis ? "" : "none";
        if (n[2] === 0 && vis) n[0].setAttribute("r", (1.5 + 5 * Math.sqrt(mxf > 0 ? Math.max(tfk[n[3]], 0) / mxf : 0)).toFixed(2));
      });
      var total = D.counts[k];
      tgNote.textContent = shown >= total
        ? "All " + num(total) + " edges of the trace at s = " + fmtS(D.sizes[k]) + ". Purple dots: each input token's share of the flow reaching the input."
        : "The first " + num(shown) + " of the " + num(total) + " edges of the trace at s = " + fmtS(D.sizes[k]) +
          " (the page embeds the first " + num(ng0) + " edges the search took; res.subgraph(s) has them all).";
    }

    // ---- selected head (or MLP): its token-level edges
    var hs = root.querySelector("svg.tls-head"), hsTitle = root.querySelector(".tls-selt"),
        hsNote = root.querySelector(".tls-headnote");
    var hH = 130;
    hs.setAttribute("width", tW); hs.setAttribute("height", hH + 60);
    hs.setAttribute("viewBox", "0 0 " + tW + " " + (hH + 60));
    var details = document.getElementById("tls-details");
    if (details) {  // a report page: link the expanded component to the circuitsvis detail views
      var link = document.createElement("a");
      link.href = "#tls-details";
      link.className = "tls-note";
      link.textContent = "\u2192 attention patterns restricted to the trace, token contributions and top tokens (circuitsvis)";
      hsNote.parentNode.appendChild(link);
    }
    var byComp = {};
    for (i = 0; i < E; i++) { var cc = dec[i].c; (byComp[cc] = byComp[cc] || []).push(i); }
    function drawHead() {
      while (hs.firstChild) hs.removeChild(hs.firstChild);
      var c = state.sel, k = state.k;
      if (c < 0) { hsTitle.textContent = "Click a head or MLP in the grid to see its token-level edges."; hsNote.textContent = ""; return; }
      var yTop = 14, yBot = hH - 14;
      text(hs, tx - 6, yTop + 3, "target", "tls-lab", {"text-anchor": "end"});
      text(hs, tx - 6, yBot + 3, c < NH ? "source" : "", "tls-lab", {"text-anchor": "end"});
      for (var t = 0; t < T; t++) {
        el("circle", {cx: X(t), cy: yTop, r: 1.3, fill: "#9ca3af"}, hs);
        if (c < NH) el("circle", {cx: X(t), cy: yBot, r: 1.3, fill: "#9ca3af"}, hs);
        if (t % stepT !== 0 && t !== T - 1) continue;
        var yt = yBot + 10;
        text(hs, X(t), yt, tok(D.tokens[t]).slice(0, 12), "tls-tok", {transform: "rotate(-60 " + X(t) + " " + yt + ")", "text-anchor": "end"});
      }
      var shown = 0, emb = 0;
      if (c < NH) {
        var idx = byComp[c] || [], wm = 0;
        idx.forEach(function (i) { if (dec[i].w > wm) wm = dec[i].w; });
        idx.forEach(function (i) {
          var d = dec[i];
          emb++;
          if (d.k > k) return;
          shown++;
          el("line", {x1: X(d.s), y1: yBot, x2: X(d.t), y2: yTop, stroke: KCOL[0],
                      "stroke-width": (0.6 + 3 * Math.sqrt(wm > 0 ? d.w / wm : 1)).toFixed(2), "stroke-opacity": 0.7,
                      "data-tip": "e" + i}, hs);
          if (!tips["e" + i]) tips["e" + i] = edgeTip(d);
        });
      } else {
        var l = c - NH, mw = 0;
        for (t = 0; t < T; t++) if (D.mw[l * T + t] > mw) mw = D.mw[l * T + t];
        for (t = 0; t < T; t++) {
          var lk = D.mk[l * T + t];
          if (lk < 0) continue;
          emb++;
          if (lk > k) continue;
          shown++;
          var hgt = (yBot - yTop) * (mw > 0 ? D.mw[l * T + t] / mw : 1);
          var bar = el("rect", {x: X(t) - dx * 0.35, y: yBot - hgt, width: dx * 0.7, height: Math.max(hgt, 1),
                                fill: KCOL[1], "fill-opacity": 0.8, "data-tip": "m" + c + "_" + t}, hs);
          (function (t, lk) {
            tips["m" + c + "_" + t] = function () {
              return "MLP" + l + " · " + qt(D.tokens[t]) + " (" + t + ")\nlocal weight " + fmt(D.mw[l * T + t]) +
                     "\nenters the trace at s = " + fmtS(D.sizes[lk]);
            };
          })(t, lk);
        }
      }
      var inTrace = compVal(D.cn, c, k);
      hsTitle.textContent = D.names[c] + " at s = " + fmtS(D.sizes[k]) + ": " + num(inTrace) + " of its " +
                            edges(D.ct[c]) + (inTrace === 1 ? " is" : " are") + " in the trace";
      hsNote.textContent = c < NH
        ? "Drawing " + num(shown) + " of them: the page embeds this head's first " + num(D.perHead) +
          " edges by rank plus any among the page's first " + num(ng0) + " (" + num(emb) +
          " embedded in all). Line width: local edge weight."
        : "Bar height: the MLP edge's local weight at each position.";
    }

    // ---- slider, label, curve markers
    var markers = root.querySelectorAll(".tls-marker");
    function drawLabel() {
      var k = state.k, parts = ["s = " + fmtS(D.sizes[k]), edges(D.counts[k])];
      D.conds.forEach(function (cn, i) { parts.push("TV " + cn + " " + fmt(D.tv[i][k])); });
      parts.push("nucleus " + fmt(D.nuc[k]) + "%");
      parts.push("top token " + qt(D.top[k][0]) + " (p " + fmt(D.top[k][1]) + ")");
      label.textContent = parts.join(" · ");
      for (var i = 0; i < markers.length; i++) {
        var xs = markers[i].getAttribute("data-xs").split(",");
        markers[i].setAttribute("x1", xs[k]); markers[i].setAttribute("x2", xs[k]);
        markers[i].setAttribute("visibility", "visible");
      }
    }
    function update() { drawLabel(); drawGrid(); drawTokens(); drawHead(); }
    slider.addEventListener("input", function () { state.k = +slider.value; update(); });
    // Keys on the focused slider are ours: a notebook's shortcuts (JupyterLab's and Notebook 7's
    // arrow-key cell navigation) would otherwise take them and cancel the browser's own step. The
    // step is applied here (the default action is cancelled, so it is not applied twice) and the
    // event goes no further.
    var STEP = {ArrowRight: 1, ArrowUp: 1, ArrowLeft: -1, ArrowDown: -1, PageUp: 5, PageDown: -5};
    slider.addEventListener("keydown", function (ev) {
      if (ev.altKey || ev.ctrlKey || ev.metaKey) return;
      var k = state.k;
      if (ev.key === "Home") k = 0;
      else if (ev.key === "End") k = K - 1;
      else if (Object.prototype.hasOwnProperty.call(STEP, ev.key)) k = clamp(k + STEP[ev.key], 0, K - 1);
      else return;
      ev.preventDefault();
      ev.stopPropagation();
      if (k !== state.k) { state.k = k; slider.value = String(k); update(); }
    });
    if (metricSel) metricSel.addEventListener("change", function () { state.metric = metricSel.value; drawGrid(); });
    state.sel = D.sel;
    slider.value = String(D.k0);
    update();
    showLive(root);
  }

  // The static picture (a PNG for where scripts do not run) gives way to the live view once drawn.
  function showLive(root) {
    var live = root.querySelector(".tls-live");
    if (live) live.hidden = false;
    var still = root.querySelectorAll(".tls-static-img, .tls-static-note");
    for (var j = 0; j < still.length; j++) still[j].hidden = true;
  }

  var roots = document.querySelectorAll(".tls-view[data-tls-circuit]:not([data-tls-ready])");
  for (var i = 0; i < roots.length; i++) {
    try { init(roots[i]); } catch (e) {
      roots[i].setAttribute("data-tls-error", String(e));
      var live = roots[i].querySelector(".tls-live");
      if (live) live.hidden = false;  // the error note is in the live part; the static picture stays
      var n = roots[i].querySelector(".tls-tgnote");
      if (n) n.textContent = "The circuit view failed: " + String(e);
      throw e;
    }
  }
})();
