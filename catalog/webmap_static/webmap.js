/* relaymap web map: the catalog's maps (/maps.json) as raster layers of titiler tiles.
 *
 * For tests and scripts: window.relaymapMap is the maplibregl.Map; window.relaymapReady is
 * true once every visible layer's tiles are drawn (the map's `idle` event) and false while
 * a change is being drawn; window.relaymapError holds a load error.
 */
(function () {
  "use strict";

  const BACKGROUND = "#e8e8e8";
  const state = { maps: [], period: "" };
  window.relaymapReady = false;

  const map = new maplibregl.Map({
    container: "map",
    style: {
      version: 8,
      sources: {},
      layers: [{ id: "background", type: "background", paint: { "background-color": BACKGROUND } }],
    },
    center: [0, 0],
    zoom: 1,
    attributionControl: false,
  });
  map.addControl(new maplibregl.NavigationControl({ showCompass: false }), "top-right");
  map.addControl(new maplibregl.ScaleControl(), "bottom-left");
  window.relaymapMap = map;

  const $ = (id) => document.getElementById(id);
  const layerId = (m) => `map-${m.id}`;
  const el = (tag, props = {}, children = []) => {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  };

  /** Ready again once the map has drawn what changed. */
  function redraw() {
    window.relaymapReady = false;
    map.once("idle", () => {
      window.relaymapReady = true;
    });
    map.triggerRepaint();
  }

  function isShown(m) {
    return m.checked && (state.period === "" || m.period === state.period);
  }

  function applyVisibility() {
    for (const m of state.maps) {
      map.setLayoutProperty(layerId(m), "visibility", isShown(m) ? "visible" : "none");
    }
    for (const group of document.querySelectorAll(".period-group")) {
      group.hidden = state.period !== "" && group.dataset.period !== state.period;
    }
    for (const group of document.querySelectorAll(".model-group")) {
      group.hidden = [...group.querySelectorAll(".period-group")].every((g) => g.hidden);
    }
    renderLegend();
    redraw();
  }

  function renderLegend() {
    const seen = new Set();
    const items = [];
    for (const m of state.maps.filter(isShown)) {
      for (const c of m.classes) {
        const key = `${c.name}|${c.color}`;
        if (seen.has(key)) continue;
        seen.add(key);
        const swatch = el("span", { className: "swatch", title: c.color });
        swatch.style.background = c.color;
        items.push(el("li", { className: "legend-item" }, [swatch, el("span", { textContent: c.name })]));
      }
    }
    $("legend").replaceChildren(...items);
  }

  function mapRow(m) {
    const toggle = el("input", { type: "checkbox", checked: true, className: "toggle" });
    toggle.dataset.map = m.id;
    toggle.addEventListener("change", () => {
      m.checked = toggle.checked;
      applyVisibility();
    });
    const slider = el("input", { type: "range", min: 0, max: 100, value: 100, className: "opacity" });
    slider.dataset.map = m.id;
    slider.setAttribute("aria-label", `opacity of ${m.id}`);
    const shown = el("span", { className: "opacity", textContent: "100%" });
    slider.addEventListener("input", () => {
      shown.textContent = `${slider.value}%`;
      map.setPaintProperty(layerId(m), "raster-opacity", Number(slider.value) / 100);
      redraw();
    });
    const when = m.datetime ? ` (${m.datetime.slice(0, 10)})` : "";
    return el("div", { className: "map-row" }, [
      el("label", {}, [toggle, ` ${m.id}${when}`]),
      el("div", {}, ["opacity ", slider, " ", shown]),
    ]);
  }

  function renderList() {
    const byModel = new Map();
    for (const m of state.maps) {
      if (!byModel.has(m.model)) byModel.set(m.model, new Map());
      const periods = byModel.get(m.model);
      if (!periods.has(m.period)) periods.set(m.period, []);
      periods.get(m.period).push(m);
    }
    const sections = [];
    for (const [model, periods] of byModel) {
      const groups = [];
      for (const [period, maps] of periods) {
        const group = el("div", { className: "period-group" }, [
          el("h4", { textContent: `period ${period}` }),
          ...maps.map(mapRow),
        ]);
        group.dataset.period = period;
        groups.push(group);
      }
      const section = el("div", { className: "model-group" }, [
        el("h3", { textContent: `model ${model}` }),
        ...groups,
      ]);
      section.dataset.model = model;
      sections.push(section);
    }
    $("maps").replaceChildren(...sections);
    const periods = [...new Set(state.maps.map((m) => m.period))].sort();
    $("period").append(...periods.map((p) => el("option", { value: p, textContent: p })));
    $("period").addEventListener("change", () => {
      state.period = $("period").value;
      applyVisibility();
    });
  }

  function addLayers() {
    for (const m of state.maps) {
      map.addSource(`src-${m.id}`, {
        type: "raster",
        tiles: [new URL(".", location.href).href + m.tiles], // ids are URL-safe (check_id)
        tileSize: 256,
        bounds: m.bounds,
        minzoom: 0,
        maxzoom: m.maxzoom,
      });
      map.addLayer({
        id: layerId(m),
        type: "raster",
        source: `src-${m.id}`,
        paint: { "raster-opacity": 1, "raster-resampling": "nearest", "raster-fade-duration": 0 },
      });
    }
  }

  function fitAll() {
    const b = state.maps.map((m) => m.bounds);
    const west = Math.min(...b.map((x) => x[0]));
    const south = Math.min(...b.map((x) => x[1]));
    const east = Math.max(...b.map((x) => x[2]));
    const north = Math.max(...b.map((x) => x[3]));
    map.fitBounds([[west, south], [east, north]], { padding: 20, animate: false });
  }

  async function classAt(lngLat) {
    const shown = state.maps.filter(isShown).reverse(); // top layer first
    for (const m of shown) {
      const q = new URLSearchParams({ lon: lngLat.lng, lat: lngLat.lat });
      const resp = await fetch(`maps/${encodeURIComponent(m.id)}/class?${q}`);
      if (!resp.ok) continue;
      const hit = await resp.json();
      if (hit.value !== null) return hit;
    }
    return null;
  }

  map.on("click", async (e) => {
    const where = `lon ${e.lngLat.lng.toFixed(5)}, lat ${e.lngLat.lat.toFixed(5)}`;
    $("info").textContent = `reading…\n${where}`;
    const hit = await classAt(e.lngLat);
    const text = hit
      ? `${hit.name} (class ${hit.value})\n${where}\nmap ${hit.map}`
      : `no class here\n${where}`;
    $("info").textContent = text;
    $("info").dataset.done = "1";
    new maplibregl.Popup({ closeButton: true }).setLngLat(e.lngLat).setText(text).addTo(map);
  });

  async function start() {
    let maps;
    try {
      const resp = await fetch("maps.json");
      if (!resp.ok) throw new Error(`maps.json: HTTP ${resp.status}`);
      maps = (await resp.json()).maps;
    } catch (err) {
      window.relaymapError = String(err);
      $("status").textContent = `Cannot list the maps: ${err}`;
      $("status").className = "error";
      return;
    }
    state.maps = maps.map((m) => ({ ...m, checked: true }));
    $("status").textContent = `${maps.length} map${maps.length === 1 ? "" : "s"} in the catalog`;
    if (!map.loaded()) await new Promise((resolve) => map.once("load", resolve));
    renderList();
    if (state.maps.length === 0) {
      window.relaymapReady = true;
      return;
    }
    addLayers();
    fitAll();
    renderLegend();
    redraw();
  }

  start();
})();
