/* relaymap web map: the catalog's layers (/maps.json) as raster layers of titiler tiles, one
 * period at a time (the latest first), or two periods compared side by side or by swipe,
 * the earlier on the left, each side with its own layer toggles.
 *
 * Per period, the layers are drawn bottom to top: imagery (true colour), land cover, stable
 * land cover, change (from the period before; "no change" is not drawn). Inside a land
 * cover's bounds, pixels without data show grey stripes; outside, the background (or the
 * base map, when one is configured). A click reads the shown layers at the point into one
 * popup. The panel shows the legend, and the class-area and transition tables and plots of
 * the periods shown (collection assets, through /tables and /assets).
 *
 * For tests and scripts: window.relaymapMap is the left maplibregl.Map (the only one when a
 * single period is shown) and window.relaymapCompare the right one (null until a period is
 * compared); window.relaymapReady is true once every visible map has drawn what changed
 * (its `idle` event) and false while a change is being drawn; window.relaymapError holds a
 * load error.
 */
(function () {
  "use strict";

  /** Drawing order, bottom first. */
  const KINDS = ["imagery", "classes", "stable", "change"];
  const KIND_NAMES = {
    imagery: "imagery (true colour)",
    classes: "land cover",
    stable: "stable land cover",
    change: "change",
  };
  const DEFAULT_ON = { imagery: true, classes: true, stable: false, change: false };
  const NODATA_TEXT = "no data (cloud / not observed)";
  const state = {
    layers: [],
    tracks: new Map(), // toggle and opacity per side ("main", "compare") and layer track
    tables: new Map(), // table URL -> {header, rows} or {error}
    period: "", // the period chosen ("main" side)
    compare: "", // the period compared with ("compare" side), or ""
    mode: "side",
    layout: "single",
    split: 0.5, // the swipe's split, a fraction of the view's width from its left
    popup: null, // {lngLat, which}
    asks: 0,
    config: null,
    draws: 0,
  };
  const maps = { a: null, b: null };
  window.relaymapReady = false;
  window.relaymapCompare = null;

  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, children = []) => {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  };
  const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
  const layerId = (l) => `layer-${l.id}`;
  /** A scene map (relaymap-maps item) has its own toggle; an area's layers share one per kind. */
  const trackKey = (l) => (l.source === "relaymap-maps" ? l.id : `${l.kind}|${l.source}`);
  /** Areas in km2: three digits at most after the leading ones, none that mean nothing. */
  const km2 = (v) => (v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(2) : String(Number(v.toPrecision(2))));

  /** Which side each map shows: "a" the left (or only) map, "b" the right one. */
  function sideOf(which) {
    if (!state.compare) return which === "a" ? "main" : null;
    const mainLeft = state.period < state.compare; // ISO dates: the earlier on the left
    return (which === "a") === mainLeft ? "main" : "compare";
  }
  const periodOfSide = (side) => (side === "main" ? state.period : side ? state.compare : "");
  const periodOf = (which) => periodOfSide(sideOf(which));

  function track(l, side) {
    const key = `${side}|${trackKey(l)}`;
    if (!state.tracks.has(key)) state.tracks.set(key, { checked: DEFAULT_ON[l.kind], opacity: 1 });
    return state.tracks.get(key);
  }

  function isShown(l, which) {
    const side = sideOf(which);
    return Boolean(side) && l.period === periodOfSide(side) && track(l, side).checked;
  }

  function visibleMaps() {
    return state.compare ? [maps.a, maps.b].filter(Boolean) : [maps.a];
  }

  /** Ready again once every visible map has drawn what changed. */
  function redraw() {
    window.relaymapReady = false;
    const draw = ++state.draws;
    const shown = visibleMaps();
    let left = shown.length;
    for (const m of shown) {
      m.once("idle", () => {
        left -= 1;
        if (left === 0 && draw === state.draws) window.relaymapReady = true;
      });
      m.triggerRepaint();
    }
  }

  /** Diagonal stripes of the two nodata greys, 4 px wide (a tile of 16 px repeats). */
  function hatchImage(colours) {
    const rgb = colours.map((c) => [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16)));
    const size = 16;
    const data = new Uint8Array(size * size * 4);
    for (let y = 0; y < size; y++) {
      for (let x = 0; x < size; x++) {
        const c = rgb[Math.floor((x + y) / 4) % 2];
        data.set([...c, 255], (y * size + x) * 4);
      }
    }
    return { width: size, height: size, data };
  }

  /** Say on the page that the base map cannot be reached (once); the maps show without it. */
  function basemapFailed(reason) {
    const note = $("no-basemap");
    if (note.classList.contains("warn")) return;
    note.className = "note warn";
    note.hidden = false;
    const why = reason ? ` (${reason})` : "";
    note.textContent = `Base map unreachable (${state.config.basemap.url}): the maps show without it${why}.`;
  }

  function plainStyle(withTiles) {
    const cfg = state.config;
    const style = {
      version: 8,
      sources: {},
      layers: [{ id: "background", type: "background", paint: { "background-color": cfg.background } }],
    };
    if (withTiles) {
      style.sources.basemap = {
        type: "raster",
        tiles: [cfg.basemap.url],
        tileSize: 256,
        attribution: cfg.basemap.attribution || "",
      };
      style.layers.push({ id: "basemap", type: "raster", source: "basemap", paint: { "raster-fade-duration": 0 } });
    }
    return style;
  }

  /** The map's style: the background, under the base map when there is one (a style URL
   * is fetched first: when it cannot be, the page says so and goes on without it). */
  async function baseStyle() {
    const bm = state.config.basemap;
    if (!bm) return plainStyle(false);
    if (bm.kind === "xyz") return plainStyle(true);
    try {
      const resp = await fetch(bm.url);
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      return bm.url;
    } catch (err) {
      basemapFailed(err.message);
      return plainStyle(false);
    }
  }

  async function makeMap(container, which) {
    const cfg = state.config;
    const map = new maplibregl.Map({
      container,
      style: await baseStyle(),
      center: [0, 0],
      zoom: 1,
      attributionControl: false,
      fadeDuration: 0,
    });
    map.addControl(new maplibregl.NavigationControl({ showCompass: false }), "top-right");
    if (which === "a") map.addControl(new maplibregl.ScaleControl(), "bottom-left");
    if (cfg.basemap) {
      const custom = cfg.basemap.kind === "style" && cfg.basemap.attribution;
      map.addControl(
        new maplibregl.AttributionControl({
          compact: false,
          ...(custom ? { customAttribution: cfg.basemap.attribution } : {}),
        }),
        "bottom-right",
      );
    }
    map.on("error", (e) => {
      const ours = e.sourceId && (e.sourceId.startsWith("src-") || e.sourceId === "footprint");
      if (cfg.basemap && e.sourceId && !ours) basemapFailed("");
      else console.error(e.error || e); // as MapLibre does when no one listens
    });
    if (!map.loaded()) await new Promise((resolve) => map.once("load", resolve));
    addLayers(map);
    map.on("click", (e) => readPoint(e.lngLat, which));
    map.on("move", placePopup);
    return map;
  }

  function addLayers(map) {
    map.addImage("nodata-hatch", hatchImage(state.config.nodata));
    map.addSource("footprint", { type: "geojson", data: { type: "FeatureCollection", features: [] } });
    map.addLayer({
      id: "nodata",
      type: "fill",
      source: "footprint",
      paint: { "fill-pattern": "nodata-hatch", "fill-antialias": false },
    });
    for (const kind of KINDS) {
      for (const l of state.layers.filter((x) => x.kind === kind)) {
        map.addSource(`src-${l.id}`, {
          type: "raster",
          tiles: [new URL(".", location.href).href + l.tiles], // ids are URL-safe (check_id)
          tileSize: 256,
          bounds: l.bounds,
          minzoom: 0,
          maxzoom: l.maxzoom,
        });
        map.addLayer({
          id: layerId(l),
          type: "raster",
          source: `src-${l.id}`,
          layout: { visibility: "none" },
          paint: {
            "raster-opacity": 1,
            "raster-resampling": kind === "imagery" ? "linear" : "nearest",
            "raster-fade-duration": 0,
          },
        });
      }
    }
  }

  /** The stripes under the shown layers with classes (a change layer is transparent where
   * nothing changed: the map beneath shows, not "no data"). */
  function footprint(which) {
    const features = state.layers
      .filter((l) => l.kind !== "change" && isShown(l, which))
      .map(({ bounds: [w, s, e, n] }) => ({
        type: "Feature",
        properties: {},
        geometry: { type: "Polygon", coordinates: [[[w, s], [e, s], [e, n], [w, n], [w, s]]] },
      }));
    return { type: "FeatureCollection", features };
  }

  function applyVisibility() {
    for (const which of ["a", "b"]) {
      const map = maps[which];
      const side = sideOf(which);
      if (!map || !side) continue;
      for (const l of state.layers) {
        map.setLayoutProperty(layerId(l), "visibility", isShown(l, which) ? "visible" : "none");
        map.setPaintProperty(layerId(l), "raster-opacity", track(l, side).opacity);
      }
      map.getSource("footprint").setData(footprint(which));
    }
    renderList();
    renderLegend();
    renderTables();
    redraw();
  }

  function legendItem(swatch, text, extra) {
    const children = [swatch, el("span", { textContent: text })];
    if (extra) children.push(el("span", { className: "km2", textContent: extra }));
    return el("li", { className: "legend-item" }, children);
  }

  function colourSwatch(colour) {
    const swatch = el("span", { className: "swatch", title: colour });
    swatch.style.background = colour;
    return swatch;
  }

  const shownLayers = () => state.layers.filter((l) => isShown(l, "a") || (state.compare && isShown(l, "b")));
  const changeTable = (l) => state.config.tables[l.source]?.transitions?.[l.id];

  /** A change layer's transitions that occurred: from the transition table when the
   * catalog has one (with areas), else from the layer's classes. */
  function transitionsOf(l) {
    const colours = new Map(l.classes.map((c) => [c.name, c.color]));
    const data = state.tables.get(changeTable(l)?.table);
    if (!data || data.error) {
      return l.classes
        .filter((c) => c.value !== state.config.no_change && c.name.includes(" → "))
        .map((c) => ({ from: c.name.split(" → ")[0], to: c.name.split(" → ")[1], km2: null, color: c.color }));
    }
    const out = [];
    const names = data.header.slice(1, -1); // from, classes..., total
    for (const row of data.rows.filter((r) => r[0] !== "total")) {
      names.forEach((to, j) => {
        const area = Number(row[j + 1]);
        if (row[0] !== to && area > 0) {
          out.push({ from: row[0], to, km2: area, color: colours.get(`${row[0]} → ${to}`) || "#888888" });
        }
      });
    }
    return out;
  }

  function changeLegend(l) {
    const groups = new Map();
    for (const t of transitionsOf(l)) {
      if (!groups.has(t.from)) groups.set(t.from, []);
      groups.get(t.from).push(legendItem(colourSwatch(t.color), `→ ${t.to}`, t.km2 === null ? "" : `${km2(t.km2)} km²`));
    }
    const blocks = [...groups].map(([from, items]) => {
      const group = el("div", { className: "change-group" }, [
        el("div", { className: "from", textContent: `from ${from}` }),
        el("ul", {}, items),
      ]);
      group.dataset.from = from;
      return group;
    });
    const title = groups.size ? `change ${l.before} → ${l.period}` : `change ${l.before} → ${l.period}: none`;
    return [el("div", { className: "change-title", textContent: title }), ...blocks];
  }

  function renderLegend() {
    const shown = shownLayers();
    const seen = new Set();
    const items = [];
    for (const l of shown.filter((x) => x.kind === "classes" || x.kind === "stable")) {
      for (const c of l.classes) {
        const key = `${c.name}|${c.color}`;
        if (seen.has(key)) continue;
        seen.add(key);
        items.push(legendItem(colourSwatch(c.color), c.name));
      }
    }
    $("legend").replaceChildren(...items);
    const changes = [...new Map(shown.filter((l) => l.kind === "change").map((l) => [l.id, l])).values()];
    $("legend-change").replaceChildren(...changes.flatMap(changeLegend));
    const more = [];
    if (shown.some((l) => l.kind !== "change")) {
      more.push(legendItem(el("span", { className: "swatch nodata" }), NODATA_TEXT));
    }
    if (shown.some((l) => l.kind === "imagery")) {
      more.push(legendItem(el("span", { className: "swatch imagery" }), "imagery: true colour, one 2–98% stretch for the three bands"));
    }
    if (changes.length) {
      more.push(legendItem(el("span", { className: "swatch" }), "change: not drawn where the class stayed (or was not observed in both periods)"));
    }
    $("legend-more").replaceChildren(...more);
  }

  function label(l) {
    if (l.source === "relaymap-maps") return `${l.id}${l.datetime ? ` (${l.datetime.slice(0, 10)})` : ""}`;
    const what = l.kind === "change" ? `change ${l.before} → ${l.period}` : KIND_NAMES[l.kind];
    return `${what} (${l.source})`;
  }

  function mapRow(l, side) {
    const t = track(l, side);
    const toggle = el("input", { type: "checkbox", checked: t.checked, className: "toggle" });
    const slider = el("input", { type: "range", min: 0, max: 100, value: Math.round(t.opacity * 100), className: "opacity" });
    for (const input of [toggle, slider]) Object.assign(input.dataset, { map: l.id, kind: l.kind, side });
    toggle.addEventListener("change", () => {
      t.checked = toggle.checked;
      applyVisibility();
    });
    slider.setAttribute("aria-label", `opacity of ${label(l)}`);
    const shown = el("span", { className: "opacity", textContent: `${slider.value}%` });
    slider.addEventListener("input", () => {
      t.opacity = Number(slider.value) / 100;
      shown.textContent = `${slider.value}%`;
      applyVisibility();
    });
    const row = el("div", { className: "map-row" }, [
      el("label", {}, [toggle, ` ${label(l)}`]),
      el("div", {}, ["opacity ", slider, " ", shown]),
    ]);
    row.dataset.kind = l.kind;
    return row;
  }

  /** Each shown period's layers with their own toggles (top layer first, as a layer list):
   * the left map's, then the right one's. */
  function renderList() {
    const groups = [];
    for (const which of ["a", "b"]) {
      const side = sideOf(which);
      if (!side) continue;
      const period = periodOfSide(side);
      const rows = state.layers
        .filter((l) => l.period === period)
        .sort((x, y) => KINDS.indexOf(y.kind) - KINDS.indexOf(x.kind));
      const where = state.compare ? `${which === "a" ? "left" : "right"} map: ` : "";
      const group = el("div", { className: "period-group" }, [
        el("h4", { textContent: `${where}${period}` }),
        ...rows.map((l) => mapRow(l, side)),
      ]);
      Object.assign(group.dataset, { period, side });
      groups.push(group);
    }
    $("maps").replaceChildren(...groups);
  }

  /** A table from rows of cells; a cell is text or [text, className]. */
  function htmlTable(caption, head, rows) {
    const cell = (tag, c) => (Array.isArray(c) ? el(tag, { textContent: c[0], className: c[1] }) : el(tag, { textContent: c }));
    return el("table", {}, [
      el("caption", { textContent: caption }),
      el("thead", {}, [el("tr", {}, head.map((h) => cell("th", h)))]),
      el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c, i) => cell(i ? "td" : "th", c))))),
    ]);
  }

  function csvLink(urls) {
    return urls.csv ? el("p", { className: "links" }, [el("a", { href: urls.csv, textContent: "CSV", download: "" })]) : "";
  }

  function plot(url, alt) {
    return el("a", { href: url, target: "_blank" }, [el("img", { src: url, alt })]);
  }

  /** The class areas of a period (one collection's class-area table). */
  function classAreaTable(urls, period) {
    const data = state.tables.get(urls.table);
    if (!data) return [];
    if (data.error) return [el("p", { className: "error", textContent: `class areas: ${data.error}` })];
    const col = (name) => data.header.indexOf(name);
    const rows = data.rows.filter((r) => r[col("period")] === period);
    if (!rows.length) return [];
    const observable = Number(rows[0][col("observable_km2")]);
    const table = htmlTable(
      `class areas ${period} (km²; observable ${km2(observable)})`,
      ["class", "area", "low confidence"],
      rows.map((r) => [r[col("class")], km2(Number(r[col("area_km2")])), km2(Number(r[col("low_confidence_km2")] || 0))]),
    );
    table.dataset.period = period;
    table.className = "class-areas";
    return [table, csvLink(urls)];
  }

  /** A change's transition matrix (km2; rows: from, columns: to; unchanged in grey). */
  function transitionTable(l) {
    const urls = changeTable(l);
    const data = urls && state.tables.get(urls.table);
    if (!data) return [];
    if (data.error) return [el("p", { className: "error", textContent: `transitions: ${data.error}` })];
    const same = (r, j) => r[0] === data.header[j] && r[0] !== "total";
    const rows = data.rows.map((r) => r.map((v, j) => (j === 0 ? v : [km2(Number(v)), same(r, j) ? "same" : ""])));
    const table = htmlTable(`transitions ${l.before} → ${l.period} (km²; rows: from, columns: to)`, ["from \\ to", ...data.header.slice(1)], rows);
    table.dataset.change = l.id;
    table.className = "transitions";
    const out = [el("div", { className: "scroll" }, [table]), csvLink(urls)];
    if (urls.plot) out.push(plot(urls.plot, `transition matrix ${l.before} → ${l.period}`));
    return out;
  }

  /** Per period shown: its class areas and the change into it; then each collection's
   * class areas over time. */
  function renderTables() {
    const parts = [];
    const sources = new Set();
    for (const which of ["a", "b"]) {
      const period = periodOf(which);
      if (!period) continue;
      const here = state.layers.filter((l) => l.period === period);
      const block = [];
      for (const source of new Set(here.map((l) => l.source))) {
        const urls = state.config.tables[source]?.class_areas;
        if (urls?.table) block.push(...classAreaTable(urls, period));
        if (urls?.plot) sources.add(source);
      }
      for (const l of here.filter((x) => x.kind === "change")) block.push(...transitionTable(l));
      if (block.length) parts.push(el("h4", { textContent: period }), ...block);
    }
    for (const source of sources) {
      parts.push(plot(state.config.tables[source].class_areas.plot, `class areas over time (${source})`));
    }
    if (!parts.length) parts.push(el("p", { className: "hint", textContent: "No tables for the periods shown." }));
    $("tables").replaceChildren(...parts);
  }

  /** Every table the catalog lists, read once (they are small). */
  async function loadTables() {
    const urls = [];
    for (const t of Object.values(state.config.tables)) {
      if (t.class_areas?.table) urls.push(t.class_areas.table);
      for (const c of Object.values(t.transitions || {})) if (c.table) urls.push(c.table);
    }
    await Promise.all(
      urls.map(async (url) => {
        try {
          const resp = await fetch(url);
          state.tables.set(url, resp.ok ? await resp.json() : { error: `HTTP ${resp.status}` });
        } catch (err) {
          state.tables.set(url, { error: String(err) });
        }
      }),
    );
  }

  function badges() {
    const on = Boolean(state.compare);
    $("badge").hidden = !on;
    $("badge-compare").hidden = !on;
    $("badge").textContent = periodOf("a");
    $("badge-compare").textContent = periodOf("b");
  }

  /** The swipe: the right map (the later period) shows right of the split only; the line
   * and its handle sit at the split. */
  function applySwipe() {
    const swipe = Boolean(state.compare) && state.mode === "swipe";
    const divider = $("divider");
    divider.hidden = !swipe;
    if (!swipe) {
      $("map-compare").style.clipPath = "";
      return;
    }
    const px = Math.round(state.split * $("view").clientWidth);
    $("map-compare").style.clipPath = `inset(0 0 0 ${px}px)`;
    divider.style.left = `${px}px`;
    divider.setAttribute("aria-valuenow", String(Math.round(state.split * 100)));
  }

  /** Drag the split's line (or its handle) with a mouse, pen or finger; arrow keys too. */
  function setupDivider() {
    const divider = $("divider");
    let drag = null;
    const view = () => $("view").getBoundingClientRect();
    divider.addEventListener("pointerdown", (e) => {
      const r = view();
      drag = { id: e.pointerId, grab: e.clientX - (r.left + state.split * r.width) };
      divider.setPointerCapture(e.pointerId);
      e.preventDefault();
    });
    divider.addEventListener("pointermove", (e) => {
      if (!drag || drag.id !== e.pointerId) return;
      const r = view();
      state.split = clamp((e.clientX - drag.grab - r.left) / r.width, 0, 1);
      applySwipe();
    });
    const end = (e) => {
      if (!drag || drag.id !== e.pointerId) return;
      drag = null;
      redraw();
    };
    divider.addEventListener("pointerup", end);
    divider.addEventListener("pointercancel", end);
    divider.addEventListener("keydown", (e) => {
      const step = { ArrowLeft: -0.02, ArrowRight: 0.02 }[e.key];
      if (!step) return;
      state.split = clamp(state.split + step, 0, 1);
      applySwipe();
      e.preventDefault();
    });
    window.addEventListener("resize", () => {
      applySwipe();
      placePopup();
    });
  }

  /** Keep two maps on the same view: a move of either is copied to the other. */
  function link(a, b) {
    let syncing = false;
    const copy = (from, to) => () => {
      if (syncing) return;
      syncing = true;
      to.jumpTo({ center: from.getCenter(), zoom: from.getZoom(), bearing: from.getBearing(), pitch: from.getPitch() });
      syncing = false;
    };
    a.on("move", copy(a, b));
    b.on("move", copy(b, a));
  }

  /** Show the period(s) chosen: one map, or two (the earlier left). When the layout
   * changes, both maps are fitted to what the map showed before. One change at a time. */
  let changing = Promise.resolve();
  function setCompare() {
    window.relaymapReady = false;
    changing = changing.then(showPeriods);
    return changing;
  }

  async function showPeriods() {
    const on = Boolean(state.compare);
    const layout = on ? state.mode : "single";
    const before = maps.a.getBounds();
    $("view").className = layout;
    $("map-compare").hidden = !on;
    $("compare-mode").hidden = !on;
    closePopup();
    badges();
    applySwipe();
    if (on && !maps.b) {
      maps.b = await makeMap("map-compare", "b");
      window.relaymapCompare = maps.b;
      link(maps.a, maps.b);
    }
    maps.a.resize();
    if (maps.b) maps.b.resize();
    if (layout !== state.layout) maps.a.fitBounds(before, { padding: 0, animate: false });
    state.layout = layout;
    if (maps.b) maps.b.jumpTo({ center: maps.a.getCenter(), zoom: maps.a.getZoom() });
    applyVisibility();
  }

  function fillPeriods() {
    const periods = [...new Set(state.layers.map((l) => l.period))].sort();
    $("period").replaceChildren(...periods.map((p) => el("option", { value: p, textContent: p })));
    state.period = periods[periods.length - 1] || "";
    $("period").value = state.period;
    fillCompare(periods);
    $("period").addEventListener("change", () => {
      state.period = $("period").value;
      if (state.compare === state.period) state.compare = "";
      fillCompare(periods);
      setCompare();
    });
    $("compare").addEventListener("change", () => {
      state.compare = $("compare").value;
      setCompare();
    });
    for (const radio of document.querySelectorAll('input[name="mode"]')) {
      radio.addEventListener("change", () => {
        state.mode = radio.value;
        setCompare();
      });
    }
  }

  function fillCompare(periods) {
    const others = periods.filter((p) => p !== state.period);
    const none = el("option", { value: "", textContent: "no other period" });
    $("compare").replaceChildren(none, ...others.map((p) => el("option", { value: p, textContent: p })));
    $("compare").value = state.compare;
  }

  function fitAll() {
    const b = state.layers.map((l) => l.bounds);
    const west = Math.min(...b.map((x) => x[0]));
    const south = Math.min(...b.map((x) => x[1]));
    const east = Math.max(...b.map((x) => x[2]));
    const north = Math.max(...b.map((x) => x[3]));
    maps.a.fitBounds([[west, south], [east, north]], { padding: 20, animate: false });
  }

  /** One layer at a point: {inside, value, name} (null when the server cannot say). */
  async function query(l, lngLat) {
    const q = new URLSearchParams({ lon: lngLat.lng, lat: lngLat.lat });
    const resp = await fetch(`maps/${encodeURIComponent(l.id)}/class?${q}`);
    return resp.ok ? resp.json() : null;
  }

  /** What the shown layers of a map say at a point, as the popup's lines: the top layer's
   * reading (a class, "no data", "no change", "unknown change"), what and when it is, the
   * layers below, the coordinates. */
  async function describe(lngLat, which) {
    const period = periodOf(which);
    const shown = state.layers
      .filter((l) => l.kind !== "imagery" && isShown(l, which))
      .sort((x, y) => KINDS.indexOf(y.kind) - KINDS.indexOf(x.kind)); // top layer first
    const hits = await Promise.all(shown.map((l) => query(l, lngLat)));
    const readings = [];
    for (const [i, l] of shown.entries()) {
      const hit = hits[i];
      if (!hit || !hit.inside) continue;
      if (l.kind !== "change") {
        const what = l.source === "relaymap-maps" ? "land cover" : KIND_NAMES[l.kind];
        readings.push({ text: hit.value === null ? NODATA_TEXT : hit.name, what: `${what}, ${l.period}` });
        continue;
      }
      const what = `change ${l.before} → ${l.period}`;
      if (hit.value === state.config.no_change) readings.push({ text: "no change", what });
      else if (hit.value !== null) readings.push({ text: hit.name, what });
      else readings.push({ text: "unknown change", what, why: await unobserved(l, lngLat) });
    }
    const where = `lon ${lngLat.lng.toFixed(5)}, lat ${lngLat.lat.toFixed(5)}`;
    if (!readings.length) {
      return [["title", "nothing mapped here"], ["", period], ["where", where]];
    }
    const [top, ...below] = readings;
    const lines = [["title", top.text], ["", top.what]];
    if (top.why) lines.push(["", top.why]);
    for (const r of below) lines.push(["", `${r.what.split(",")[0]}: ${r.text}`]);
    lines.push(["where", where]);
    return lines;
  }

  /** Why a change is unknown: the periods of its land cover without data at the point. */
  async function unobserved(change, lngLat) {
    const covers = [change.before, change.period].map((p) =>
      state.layers.find((l) => l.kind === "classes" && l.source === change.source && l.period === p),
    );
    const hits = await Promise.all(covers.map((l) => (l ? query(l, lngLat) : null)));
    const missing = [change.before, change.period].filter((p, i) => hits[i] && hits[i].value === null);
    return missing.length ? `no data in ${missing.join(" and ")}` : "not observed in both periods";
  }

  function showPopup(lines, done) {
    const node = $("popup");
    node.querySelector(".lines").replaceChildren(
      ...lines.map(([cls, text]) => el("div", { className: `line ${cls}`.trim(), textContent: text })),
    );
    node.dataset.done = done ? "1" : "0";
    node.hidden = false;
    placePopup();
  }

  function closePopup() {
    state.popup = null;
    state.asks += 1;
    $("popup").hidden = true;
  }

  /** The popup over its point, inside the view: above the point, or below it when there is
   * no room above; hidden while its point is off its map. */
  function placePopup() {
    const p = state.popup;
    const node = $("popup");
    if (!p) return;
    const view = $("view").getBoundingClientRect();
    const box = maps[p.which].getContainer().getBoundingClientRect();
    const at = maps[p.which].project(p.lngLat);
    const off = at.x < 0 || at.y < 0 || at.x > box.width || at.y > box.height;
    node.style.visibility = off ? "hidden" : "";
    const x = box.left - view.left + at.x;
    const y = box.top - view.top + at.y;
    const [w, h, gap, margin] = [node.offsetWidth, node.offsetHeight, 10, 4];
    const left = clamp(x - w / 2, margin, view.width - w - margin);
    const top = y - h - gap >= margin ? y - h - gap : clamp(y + gap, margin, view.height - h - margin);
    node.style.left = `${left}px`;
    node.style.top = `${top}px`;
  }

  /** A click: one popup (a new click replaces it, on either map) with what is there. */
  async function readPoint(lngLat, which) {
    const ask = ++state.asks;
    state.popup = { lngLat, which };
    showPopup([["title", "reading…"]], false);
    const lines = await describe(lngLat, which);
    if (ask === state.asks) showPopup(lines, true);
  }

  function describeBasemap() {
    const bm = state.config.basemap;
    $("basemap").textContent = bm
      ? `Base map: ${bm.attribution || bm.url}`
      : "No base map: the page works offline.";
    const note = $("no-basemap");
    note.hidden = Boolean(bm);
    note.textContent = "No base map (offline): relaymap serve --basemap URL adds one";
  }

  async function start() {
    let listed;
    try {
      const resp = await fetch("maps.json");
      if (!resp.ok) throw new Error(`maps.json: HTTP ${resp.status}`);
      listed = await resp.json();
    } catch (err) {
      window.relaymapError = String(err);
      $("status").textContent = `Cannot list the maps: ${err}`;
      $("status").className = "error";
      return;
    }
    state.config = listed;
    state.layers = [...listed.maps, ...(listed.overlays || [])];
    const n = listed.maps.length;
    $("status").textContent = `${n} map${n === 1 ? "" : "s"} in the catalog`;
    describeBasemap();
    $("popup").querySelector(".close").addEventListener("click", closePopup);
    setupDivider();
    const tables = loadTables();
    maps.a = await makeMap("map", "a");
    window.relaymapMap = maps.a;
    fillPeriods();
    await tables;
    if (state.layers.length === 0) {
      window.relaymapReady = true;
      return;
    }
    fitAll();
    applyVisibility();
  }

  start();
})();
