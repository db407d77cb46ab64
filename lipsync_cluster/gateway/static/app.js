// lipsync-cluster live page: microphone -> AudioWorklet (16 kHz PCM) -> the gateway -> the avatar.
// Two transports: WebRTC (default: POST /webrtc/offer; a <video> plays the avatar's video and voice,
// in sync; PCM and controls go on a data channel) and the WebSocket (JPEG frames drawn on a canvas),
// used when WebRTC is not available or with ?transport=ws. Both carry the same control messages
// (docs/STREAMING.md). `window.lsc` exposes the page state (used by tests).

const FPS = 25;
const FRAME_MS = 1000 / FPS;
const SAMPLES_PER_FRAME = 640; // 16 kHz / 25 fps
const HEADER_BYTES = 32;
const FORMATS = { 1: "image/jpeg", 2: "image/png" };
const PLAYOUT_DELAY_MS = 80; // jitter buffer before the first frame of a run is shown
const LATE_RESYNC_MS = 250; // a frame this late re-anchors the playout clock
const MAX_BUFFERED = 12; // frames waiting to be drawn before the oldest are skipped

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), transport: $("transport"), video: $("video"), connect: $("connect"), mic: $("mic"), stop: $("stop"), interrupt: $("interrupt"), listen: $("listen"), level: $("level"), status: $("status"),
  canvas: $("view"), overlay: $("overlay"), fps: $("fps"), latency: $("latency"), glatency: $("glatency"),
  drops: $("drops"), frame: $("frame"), log: $("log"),
};
const ctx2d = ui.canvas.getContext("2d", { willReadFrequently: true });

const state = {
  ws: null, pc: null, dc: null, transport: null, connected: false, started: false, micOn: false,
  videoFrames: 0, // WebRTC: frames the <video> presented
  audioCtx: null, micStream: null, worklet: null,
  samplesSent: 0, sendTimes: new Map(), // frame index -> time its audio was fully sent
  received: 0, framesDrawn: 0, skipped: 0, serverDrops: 0, decodeErrors: 0,
  queue: [], anchor: null, drawTimes: [], latencies: [],
  lastDrawn: null, lastStats: null, level: 0, maxLevel: 0, errors: [], messages: [],
  // conversation controls: listening (mic not sent, idle frames), interrupts, where switches landed
  listening: false, held: null, cuts: [], switches: [], runs: [], // runs: [first index received, model]
  lastIndex: null, indexGaps: 0, // frames received out of sequence (only gateway drops may cause them)
};
window.lsc = state;

function log(text) {
  state.messages.push(text);
  ui.log.textContent = state.messages.slice(-8).join("\n");
}

function setStatus(text) { ui.status.textContent = text; }

function percentile(values, p) {
  if (!values.length) return null;
  const a = [...values].sort((x, y) => x - y);
  return a[Math.min(a.length - 1, Math.floor((p / 100) * a.length))];
}

// --- models --------------------------------------------------------------------------------

async function loadModels() {
  try {
    const r = await fetch("/api/models");
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    const signature = body.models.map((m) => `${m.model_id}:${m.loaded}`).join(",");
    if (signature === state.modelSignature) return;
    state.modelSignature = signature;
    const current = ui.model.value;
    ui.model.innerHTML = "";
    for (const m of body.models) {
      const opt = document.createElement("option");
      opt.value = m.model_id;
      opt.textContent = m.model_id + (m.loaded ? " ●" : "");
      ui.model.appendChild(opt);
    }
    if (current && body.models.some((m) => m.model_id === current)) ui.model.value = current;
    state.models = body.models.map((m) => m.model_id);
  } catch (err) {
    log("could not list models: " + err.message);
  }
}

ui.model.addEventListener("change", () => {
  if (state.started) send(JSON.stringify({ type: "switch", model_id: ui.model.value }));
});

// The open link to the gateway (the WebSocket or the data channel) and what goes on it.
function linkOpen() {
  if (state.transport === "webrtc") return !!state.dc && state.dc.readyState === "open";
  return !!state.ws && state.ws.readyState === WebSocket.OPEN;
}

function send(data) {
  if (!linkOpen()) return;
  (state.transport === "webrtc" ? state.dc : state.ws).send(data);
}

// Interrupt and leaving listening move the stream's audio position: the microphone's chunks are
// held until the gateway says where the next audio starts, so the page's latency clock stays right.
function sendPositionControl(message) {
  if (!state.started) return;
  state.held = [];
  send(JSON.stringify(message));
}

function resumeAt(samples) {
  state.samplesSent = samples;
  state.sendTimes.clear();
  const held = state.held || [];
  state.held = null;
  for (const pcm of held) sendPcm(pcm);
}

// --- connecting -----------------------------------------------------------------------------

function wantWebRTC() {
  const forced = new URLSearchParams(location.search).get("transport");
  if (forced) ui.transport.value = forced === "ws" ? "ws" : "webrtc";
  return ui.transport.value === "webrtc" && typeof RTCPeerConnection === "function";
}

function connect() {
  if (state.ws || state.pc) { disconnect(); return; }
  if (!wantWebRTC()) { connectWs(); return; }
  connectWebRTC().catch((err) => {
    log(`WebRTC: ${err.message}; falling back to JPEG frames over the WebSocket`);
    closePeer();
    connectWs();
  });
}

function disconnect() {
  if (state.ws) state.ws.close();
  if (state.pc) { closePeer(); onClosed(); }
}

function closePeer() {
  if (state.pc) state.pc.close();
  state.pc = state.dc = null;
  ui.video.srcObject = null;
}

function linkReady() {
  state.connected = true;
  ui.connect.textContent = "Disconnect";
  ui.mic.disabled = false;
  ui.stop.disabled = false;
  ui.interrupt.disabled = false;
  ui.listen.disabled = false;
}

function onClosed() {
  state.connected = false;
  state.started = false;
  state.ws = null;
  ui.connect.textContent = "Connect";
  ui.stop.disabled = true;
  ui.interrupt.disabled = true;
  ui.listen.disabled = true;
  setStatus("disconnected");
}

function waitFor(check, ms, what) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const poll = () => {
      if (check()) resolve();
      else if (performance.now() - t0 > ms) reject(new Error(`no ${what} within ${ms / 1000} s`));
      else setTimeout(poll, 20);
    };
    poll();
  });
}

// WebRTC: one offer (the gateway does not trickle: the offer carries its candidates), one answer.
async function connectWebRTC() {
  state.transport = "webrtc";
  setStatus("connecting (WebRTC)…");
  const pc = new RTCPeerConnection();
  state.pc = pc;
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  const dc = pc.createDataChannel("control");
  dc.binaryType = "arraybuffer";
  state.dc = dc;
  const media = new MediaStream();
  pc.ontrack = (ev) => { media.addTrack(ev.track); ui.video.srcObject = media; };
  dc.onmessage = (ev) => { if (typeof ev.data === "string") onControl(JSON.parse(ev.data)); };
  pc.onconnectionstatechange = () => {
    if (state.pc === pc && (pc.connectionState === "failed" || pc.connectionState === "closed")) {
      log(`WebRTC connection ${pc.connectionState}`);
      closePeer();
      onClosed();
    }
  };
  await pc.setLocalDescription(await pc.createOffer());
  await waitFor(() => pc.iceGatheringState === "complete", 3000, "ICE candidates").catch(() => {});
  const body = { sdp: pc.localDescription.sdp, type: "offer", model: ui.model.value };
  const lookahead = new URLSearchParams(location.search).get("lookahead");
  if (lookahead !== null) body.lookahead_frames = Number(lookahead);
  const r = await fetch("/webrtc/offer", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) });
  const answer = await r.json().catch(() => ({}));
  if (!r.ok) {
    const why = answer.error ? `${answer.error.code}: ${answer.error.message}` : `HTTP ${r.status}`;
    if (r.status === 400 || r.status === 404) { log(`offer refused: ${why}`); closePeer(); onClosed(); return; }
    throw new Error(why); // 501 (no webrtc extra), 503 (full) ...: try the WebSocket
  }
  await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
  await waitFor(() => dc.readyState === "open", 10000, "data channel");
  state.codec = answer.video_codec;
  linkReady();
  onControl({ type: "started", model_id: body.model, transport: "webrtc" });
  ui.canvas.hidden = true;
  ui.video.hidden = false;
  log(`WebRTC: ${answer.video_codec} video and Opus audio, one clock`);
  countVideoFrames(ui.video, pc);
}

function countVideoFrames(video, pc) {
  if (!video.requestVideoFrameCallback) return;
  const onFrame = (now, meta) => {
    if (state.pc !== pc) return;
    state.videoFrames += 1;
    state.drawTimes.push(now);
    state.lastVideo = { width: meta.width, height: meta.height, rtpTimestamp: meta.rtpTimestamp };
    ui.overlay.textContent = "";
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

function connectWs() {
  state.transport = "ws";
  ui.canvas.hidden = false;
  ui.video.hidden = true;
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  setStatus("connecting…");
  ws.onopen = () => {
    linkReady();
    startStream();
  };
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onControl(JSON.parse(ev.data)) : onFrame(ev.data));
  ws.onclose = onClosed;
  ws.onerror = () => log("socket error");
}

function startStream() {
  state.samplesSent = 0;
  state.held = null;
  state.runs = [];
  state.lastIndex = null;
  state.sendTimes.clear();
  state.queue.forEach((f) => f.bitmap.close());
  state.queue = [];
  state.anchor = null;
  state.latencies = [];
  state.ws.send(JSON.stringify({ type: "start", model_id: ui.model.value }));
}

function onControl(msg) {
  switch (msg.type) {
    case "hello":
      setStatus(`connected (${msg.session})`);
      break;
    case "started":
      state.started = true;
      state.samplesSent = 0;
      state.sendTimes.clear();
      if (state.listening) send(JSON.stringify({ type: "listen", on: true }));
      setStatus(`streaming ${msg.model_id}` + (state.transport === "webrtc" ? ` (WebRTC, ${state.codec})` : ""));
      ui.overlay.textContent = state.micOn ? "" : "Start the microphone and speak.";
      break;
    case "switched":
      state.switches.push({ model_id: msg.model_id, at_frame: msg.at_frame });
      log(`switching to ${msg.model_id} at frame ${msg.at_frame}`);
      setStatus(`streaming ${msg.model_id}`);
      break;
    case "interrupted":
      state.cuts.push(msg.cut);
      log(`interrupted: frames go on from ${msg.cut}`);
      resumeAt(msg.samples);
      break;
    case "listening":
      log(msg.on ? "listening: idle frames" : "talking");
      if (!msg.on) resumeAt(msg.samples);
      break;
    case "stats":
      state.lastStats = msg;
      state.serverDrops = msg.drops;
      if (msg.latency && msg.latency.p50_ms != null) {
        ui.glatency.textContent = `${Math.round(msg.latency.p50_ms)} / ${Math.round(msg.latency.p99_ms)}`;
      }
      break;
    case "ended":
      state.started = false;
      log(`stream ended after ${msg.frames} frames`);
      setStatus("stopped");
      break;
    case "error":
      state.errors.push(msg);
      if (state.held) resumeAt(state.samplesSent);
      log(`error ${msg.code}: ${msg.message}`);
      break;
    default:
      break;
  }
}

function onFrame(buf) {
  const view = new DataView(buf);
  const magic = String.fromCharCode(view.getUint8(0), view.getUint8(1), view.getUint8(2), view.getUint8(3));
  if (magic !== "LSF1") { log("unknown binary message"); return; }
  const index = view.getUint32(4, true);
  const pts = view.getFloat64(8, true);
  const background = view.getUint32(16, true);
  const gatewayLatency = view.getFloat32(20, true);
  const drops = view.getUint32(24, true);
  const modelLen = view.getUint16(28, true);
  const format = view.getUint8(30);
  const model = new TextDecoder().decode(new Uint8Array(buf, HEADER_BYTES, modelLen));
  const image = new Blob([new Uint8Array(buf, HEADER_BYTES + modelLen)], { type: FORMATS[format] || "image/jpeg" });
  state.received += 1;
  const run = state.runs[state.runs.length - 1];
  if (!run || run[1] !== model) state.runs.push([index, model]);
  if (state.lastIndex !== null && index !== state.lastIndex + 1) state.indexGaps += 1;
  state.lastIndex = index;
  state.serverDrops = Math.max(state.serverDrops, drops);
  const arrived = performance.now();
  createImageBitmap(image).then((bitmap) => {
    state.queue.push({ index, pts, background, model, gatewayLatency, bitmap, arrived });
    state.queue.sort((a, b) => a.index - b.index);
    if (state.queue.length > MAX_BUFFERED) state.anchor = null; // the playout clock fell behind: catch up
    while (state.queue.length > MAX_BUFFERED) { state.queue.shift().bitmap.close(); state.skipped += 1; }
  }).catch(() => { state.decodeErrors += 1; });
}

// --- playout: one frame every 40 ms, on a clock anchored at the first frame of a run ---------

function due(frame) { return state.anchor.t + (frame.index - state.anchor.index) * FRAME_MS; }

function tick() {
  const now = performance.now();
  if (state.queue.length) {
    if (!state.anchor || now - due(state.queue[0]) > LATE_RESYNC_MS || state.queue[0].index < state.anchor.index) {
      state.anchor = { t: now + PLAYOUT_DELAY_MS, index: state.queue[0].index };
    }
    let show = null;
    while (state.queue.length && due(state.queue[0]) <= now) {
      if (show) { show.bitmap.close(); state.skipped += 1; }
      show = state.queue.shift();
    }
    if (show) draw(show, now);
  }
}

function draw(frame, now) {
  if (ui.canvas.width !== frame.bitmap.width || ui.canvas.height !== frame.bitmap.height) {
    ui.canvas.width = frame.bitmap.width;
    ui.canvas.height = frame.bitmap.height;
  }
  ctx2d.drawImage(frame.bitmap, 0, 0);
  frame.bitmap.close();
  ui.overlay.textContent = "";
  state.framesDrawn += 1;
  state.drawTimes.push(now);
  const sent = state.sendTimes.get(frame.index);
  if (sent !== undefined) {
    state.latencies.push(now - sent);
    if (state.latencies.length > 500) state.latencies.shift();
    state.sendTimes.delete(frame.index);
  }
  state.lastDrawn = { index: frame.index, model_id: frame.model, background_index: frame.background, pts: frame.pts };
  ui.frame.textContent = `${frame.index} · ${frame.model} · ${frame.background}`;
}

function refreshStats() {
  const now = performance.now();
  while (state.drawTimes.length && now - state.drawTimes[0] > 1000) state.drawTimes.shift();
  ui.fps.textContent = state.drawTimes.length.toFixed(1);
  const p50 = percentile(state.latencies, 50);
  const p99 = percentile(state.latencies, 99);
  ui.latency.textContent = p50 == null ? "–" : `${Math.round(p50)} / ${Math.round(p99)}`;
  ui.drops.textContent = `${state.serverDrops} / ${state.skipped}`;
  ui.level.style.width = `${Math.min(100, Math.round(state.level * 300))}%`;
}

setInterval(tick, 5);
setInterval(refreshStats, 250);

// --- microphone ------------------------------------------------------------------------------

async function startMic() {
  if (state.micOn) { stopMic(); return; }
  try {
    state.micStream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    state.audioCtx = new AudioContext();
    await state.audioCtx.audioWorklet.addModule("/static/pcm-worklet.js");
    const source = state.audioCtx.createMediaStreamSource(state.micStream);
    state.worklet = new AudioWorkletNode(state.audioCtx, "pcm16k", { processorOptions: { chunk: 320 } });
    state.worklet.port.onmessage = (ev) => onPcm(ev.data);
    const mute = state.audioCtx.createGain();
    mute.gain.value = 0; // keep the graph pulled without playing the microphone back
    source.connect(state.worklet).connect(mute).connect(state.audioCtx.destination);
    await state.audioCtx.resume();
    state.micOn = true;
    ui.mic.textContent = "Stop microphone";
    ui.overlay.textContent = state.started ? "" : ui.overlay.textContent;
    log(`microphone on (${state.audioCtx.sampleRate} Hz, resampled to 16 kHz in an AudioWorklet)`);
  } catch (err) {
    log("microphone: " + err.message);
  }
}

function stopMic() {
  if (state.micStream) state.micStream.getTracks().forEach((t) => t.stop());
  if (state.audioCtx) state.audioCtx.close();
  state.micStream = state.audioCtx = state.worklet = null;
  state.micOn = false;
  state.level = 0;
  ui.mic.textContent = "Start microphone";
}

function onPcm({ pcm, level }) {
  state.level = level;
  state.maxLevel = Math.max(state.maxLevel, level);
  if (!state.started || !linkOpen()) return;
  if (state.listening) return; // the avatar listens: the gateway plays idle frames
  if (state.held) { state.held.push(pcm); return; }
  sendPcm(pcm);
}

function sendPcm(pcm) {
  send(pcm.buffer);
  const before = Math.floor(state.samplesSent / SAMPLES_PER_FRAME);
  state.samplesSent += pcm.length;
  const after = Math.floor(state.samplesSent / SAMPLES_PER_FRAME);
  const now = performance.now();
  for (let k = before; k < after; k++) state.sendTimes.set(k, now);
  if (state.sendTimes.size > 2000) { // frames that never came (dropped): forget them
    const cut = after - 2000;
    for (const k of state.sendTimes.keys()) if (k < cut) state.sendTimes.delete(k);
  }
}

// --- buttons ---------------------------------------------------------------------------------

ui.connect.addEventListener("click", connect);
ui.mic.addEventListener("click", startMic);
ui.stop.addEventListener("click", () => {
  if (state.transport === "webrtc") { disconnect(); return; } // a WebRTC stream ends with its connection
  if (state.ws && state.started) state.ws.send(JSON.stringify({ type: "stop" }));
  else if (state.ws) startStream();
  ui.stop.textContent = state.started ? "Restart" : "Stop";
});

ui.interrupt.addEventListener("click", () => sendPositionControl({ type: "interrupt" }));
ui.listen.addEventListener("click", () => {
  state.listening = !state.listening;
  ui.listen.textContent = state.listening ? "Talk" : "Listen";
  if (!state.started) return;
  if (state.listening) send(JSON.stringify({ type: "listen", on: true }));
  else sendPositionControl({ type: "listen", on: false });
});

loadModels();
setInterval(loadModels, 10000);
