/* relaymap web map: the catalog's layers (/maps.json) as raster layers of titiler tiles, one
 * period at a time (the latest first), or two periods compared side by side or by swipe.
 *
 * Per period, the layers are drawn bottom to top: imagery (true colour), land cover, stable
 * land cover, change (from the period before). Inside a layer's bounds, pixels without data
 * show grey stripes; outside, the background (or the base map, when one is configured).
 *
 * For tests and scripts: window.relaymapMap is the (left) maplibregl.Map and
 * window.relaymapCompare the map of the compared period (null until one is compared);
 * window.relaymapReady is true once every visible map has drawn what changed (its `idle`
 * event) and false while a change is being drawn; window.relaymapError holds a load error.
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
  const state = {
    layers: [],
    tracks: new Map(), // toggle and opacity, shared by a layer's periods
    period: "",
    compare: "",
    mode: "side",
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
  const layerId = (l) => `layer-${l.id}`;
  /** A scene map (relaymap-maps item) has its own toggle; an area's layers share one per kind. */
  const trackKey = (l) => (l.source === "relaymap-maps" ? l.id : `${l.kind}|${l.source}`);
  const track = (l) => state.tracks.get(trackKey(l));
  const periodOf = (which) => (which === "a" ? state.period : state.compare);

  function isShown(l, which) {
    return l.period === periodOf(which) && track(l).checked;
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

  function baseStyle() {
    const cfg = state.config;
    if (cfg.basemap && cfg.basemap.kind === "style") return cfg.basemap.url;
    const style = {
      version: 8,
      sources: {},
      layers: [{ id: "background", type: "background", paint: { "background-color": cfg.background } }],
    };
    if (cfg.basemap) {
      style.sources.basemap = {
        type: "raster",
        tiles: [cfg.basemap.url],
        tileSize: 256,
        attribution: cfg.basemap.attribution || "",
      };
      style.layers.push({
        id: "basemap",
        type: "raster",
        source: "basemap",
        paint: { "raster-fade-duration": 0 },
      });
    }
    return style;
  }

  async function makeMap(container) {
    const cfg = state.config;
    const map = new maplibregl.Map({
      container,
      style: baseStyle(),
      center: [0, 0],
      zoom: 1,
      attributionControl: false,
      fadeDuration: 0,
    });
    map.addControl(new maplibregl.NavigationControl({ showCompass: false }), "top-right");
    if (container === "map") map.addControl(new maplibregl.ScaleControl(), "bottom-left");
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
    if (!map.loaded()) await new Promise((resolve) => map.once("load", resolve));
    addLayers(map);
    map.on("click", (e) => readClass(e, map === maps.a ? "a" : "b"));
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

  function footprint(which) {
    const features = state.layers
      .filter((l) => isShown(l, which))
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
      if (!map) continue;
      for (const l of state.layers) {
        map.setLayoutProperty(layerId(l), "visibility", isShown(l, which) ? "visible" : "none");
        map.setPaintProperty(layerId(l), "raster-opacity", track(l).opacity);
      }
      map.getSource("footprint").setData(footprint(which));
    }
    renderList();
    renderLegend();
    redraw();
  }

  function legendItem(swatch, text) {
    return el("li", { className: "legend-item" }, [swatch, el("span", { textContent: text })]);
  }

  function colourSwatch(colour) {
    const swatch = el("span", { className: "swatch", title: colour });
    swatch.style.background = colour;
    return swatch;
  }

  function renderLegend() {
    const shown = state.layers.filter((l) => isShown(l, "a") || (state.compare && isShown(l, "b")));
    const entries = (kinds) => {
      const seen = new Set();
      const items = [];
      for (const l of shown.filter((x) => kinds.includes(x.kind))) {
        for (const c of l.classes) {
          const key = `${c.name}|${c.color}`;
          if (seen.has(key)) continue;
          seen.add(key);
          items.push(legendItem(colourSwatch(c.color), c.name));
        }
      }
      return items;
    };
    $("legend").replaceChildren(...entries(["classes", "stable"]));
    $("legend-change").replaceChildren(...entries(["change"]));
    const more = [];
    if (shown.length) more.push(legendItem(el("span", { className: "swatch nodata" }), "no data (cloud, no imagery)"));
    if (shown.some((l) => l.kind === "imagery")) {
      more.push(legendItem(el("span", { className: "swatch imagery" }), "imagery: true colour, 2-98% stretch"));
    }
    $("legend-more").replaceChildren(...more);
  }

  function label(l) {
    if (l.source === "relaymap-maps") return `${l.id}${l.datetime ? ` (${l.datetime.slice(0, 10)})` : ""}`;
    const what = l.kind === "change" ? `change ${l.before} → ${l.period}` : KIND_NAMES[l.kind];
    return `${what} (${l.source})`;
  }

  function mapRow(l) {
    const t = track(l);
    const toggle = el("input", { type: "checkbox", checked: t.checked, className: "toggle" });
    toggle.dataset.map = l.id;
    toggle.dataset.kind = l.kind;
    toggle.addEventListener("change", () => {
      t.checked = toggle.checked;
      applyVisibility();
    });
    const value = Math.round(t.opacity * 100);
    const slider = el("input", { type: "range", min: 0, max: 100, value, className: "opacity" });
    slider.dataset.map = l.id;
    slider.dataset.kind = l.kind;
    slider.setAttribute("aria-label", `opacity of ${l.id}`);
    const shown = el("span", { className: "opacity", textContent: `${value}%` });
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

  /** Rows of the periods shown: the layers of each, bottom layer last (as a layer list). */
  function renderList() {
    const groups = [];
    const done = new Set();
    for (const [which, title] of [["a", "period"], ["b", "compared with"]]) {
      const period = periodOf(which);
      if (!period) continue;
      const rows = state.layers
        .filter((l) => l.period === period && !done.has(trackKey(l)))
        .sort((x, y) => KINDS.indexOf(y.kind) - KINDS.indexOf(x.kind));
      rows.forEach((l) => done.add(trackKey(l)));
      if (!rows.length) continue;
      const group = el("div", { className: "period-group" }, [
        el("h4", { textContent: `${title} ${period}` }),
        ...rows.map(mapRow),
      ]);
      group.dataset.period = period;
      groups.push(group);
    }
    $("maps").replaceChildren(...groups);
  }

  function badges() {
    const on = Boolean(state.compare);
    $("badge").hidden = !on;
    $("badge-compare").hidden = !on;
    $("badge").textContent = state.period;
    $("badge-compare").textContent = state.compare;
  }

  function applySwipe() {
    const swipe = state.compare && state.mode === "swipe";
    $("map-compare").style.clipPath = swipe ? `inset(0 0 0 ${$("swipe").value}%)` : "";
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

  async function setCompare() {
    const on = Boolean(state.compare);
    $("view").className = on ? state.mode : "single";
    $("map-compare").hidden = !on;
    $("swipe").hidden = !(on && state.mode === "swipe");
    $("compare-mode").hidden = !on;
    badges();
    applySwipe();
    if (on && !maps.b) {
      maps.b = await makeMap("map-compare");
      window.relaymapCompare = maps.b;
      link(maps.a, maps.b);
    }
    maps.a.resize();
    if (maps.b) {
      maps.b.resize();
      maps.b.jumpTo({ center: maps.a.getCenter(), zoom: maps.a.getZoom() });
    }
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
    $("swipe").addEventListener("input", () => {
      applySwipe();
      redraw();
    });
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

  async function classAt(lngLat, which) {
    const shown = state.layers
      .filter((l) => l.kind !== "imagery" && isShown(l, which))
      .sort((x, y) => KINDS.indexOf(y.kind) - KINDS.indexOf(x.kind)); // top layer first
    for (const l of shown) {
      const q = new URLSearchParams({ lon: lngLat.lng, lat: lngLat.lat });
      const resp = await fetch(`maps/${encodeURIComponent(l.id)}/class?${q}`);
      if (!resp.ok) continue;
      const hit = await resp.json();
      if (hit.value !== null) return hit;
    }
    return null;
  }

  async function readClass(e, which) {
    const where = `lon ${e.lngLat.lng.toFixed(5)}, lat ${e.lngLat.lat.toFixed(5)}`;
    $("info").textContent = `reading…\n${where}`;
    const hit = await classAt(e.lngLat, which);
    const text = hit
      ? `${hit.name} (class ${hit.value})\n${where}\nmap ${hit.map}`
      : `no class here\n${where}`;
    $("info").textContent = text;
    $("info").dataset.done = "1";
    new maplibregl.Popup({ closeButton: true }).setLngLat(e.lngLat).setText(text).addTo(e.target);
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
    for (const l of state.layers) {
      if (!state.tracks.has(trackKey(l))) state.tracks.set(trackKey(l), { checked: DEFAULT_ON[l.kind], opacity: 1 });
    }
    const n = listed.maps.length;
    $("status").textContent = `${n} map${n === 1 ? "" : "s"} in the catalog`;
    describeBasemap();
    maps.a = await makeMap("map");
    window.relaymapMap = maps.a;
    fillPeriods();
    if (state.layers.length === 0) {
      window.relaymapReady = true;
      return;
    }
    fitAll();
    applyVisibility();
  }

  start();
})();
