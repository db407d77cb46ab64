// AudioWorklet processor "pcm16k": microphone audio at the context's rate -> 16 kHz mono int16 chunks.
//
// Resampling is band-limited: every output sample is a windowed-sinc (Blackman, 2 x 16 taps)
// interpolation of the input at its exact fractional position, with the cut-off at 0.95 x the
// lower Nyquist frequency (7.6 kHz when downsampling to 16 kHz), so there is no aliasing and no
// drift (positions advance by exactly sampleRate / 16000 input samples per output sample).
// Posts {pcm: Int16Array(chunk), level: RMS of the chunk in [0, 1]} every `chunk` output samples.

const OUT_RATE = 16000;
const HALF = 16; // taps each side
const PHASES = 512; // kernel table resolution

class Pcm16k extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.chunk = opts.chunk || 320; // 20 ms
    this.step = sampleRate / OUT_RATE; // input samples per output sample
    const cutoff = 0.95 * Math.min(1, OUT_RATE / sampleRate); // of the input Nyquist
    // table[p * 2HALF + t]: weight of input sample (floor(pos) - HALF + 1 + t) at phase p/PHASES
    this.table = new Float32Array((PHASES + 1) * 2 * HALF);
    for (let p = 0; p <= PHASES; p++) {
      const frac = p / PHASES;
      let sum = 0;
      for (let t = 0; t < 2 * HALF; t++) {
        const x = t - HALF + 1 - frac; // distance of that input sample from the output position
        const s = x === 0 ? 1 : Math.sin(Math.PI * cutoff * x) / (Math.PI * cutoff * x);
        const w = 0.42 + 0.5 * Math.cos((Math.PI * x) / HALF) + 0.08 * Math.cos((2 * Math.PI * x) / HALF);
        const v = Math.abs(x) >= HALF ? 0 : cutoff * s * w;
        this.table[p * 2 * HALF + t] = v;
        sum += v;
      }
      for (let t = 0; t < 2 * HALF; t++) this.table[p * 2 * HALF + t] /= sum || 1; // unity DC gain
    }
    this.buf = new Float32Array(16384);
    this.len = HALF; // start with HALF samples of silence as history
    this.pos = HALF; // fractional input position of the next output sample (the first real one)
    this.out = new Int16Array(this.chunk);
    this.outLen = 0;
    this.sumSq = 0;
  }

  append(samples) {
    if (this.len + samples.length > this.buf.length) {
      const keep = Math.max(0, Math.floor(this.pos) - HALF);
      this.buf.copyWithin(0, keep, this.len);
      this.len -= keep;
      this.pos -= keep;
      if (this.len + samples.length > this.buf.length) {
        const bigger = new Float32Array(2 * (this.len + samples.length));
        bigger.set(this.buf.subarray(0, this.len));
        this.buf = bigger;
      }
    }
    this.buf.set(samples, this.len);
    this.len += samples.length;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || input[0].length === 0) return true;
    let mono = input[0];
    if (input.length > 1) {
      mono = new Float32Array(input[0].length);
      for (const ch of input) for (let i = 0; i < ch.length; i++) mono[i] += ch[i] / input.length;
    }
    this.append(mono);
    const taps = 2 * HALF;
    while (Math.floor(this.pos) + HALF < this.len) {
      const base = Math.floor(this.pos);
      const phase = Math.round((this.pos - base) * PHASES);
      const row = phase * taps;
      let acc = 0;
      for (let t = 0, j = base - HALF + 1; t < taps; t++, j++) acc += this.buf[j] * this.table[row + t];
      const v = Math.max(-1, Math.min(1, acc));
      this.out[this.outLen++] = Math.round(v * 32767);
      this.sumSq += v * v;
      this.pos += this.step;
      if (this.outLen === this.chunk) {
        const level = Math.sqrt(this.sumSq / this.chunk);
        this.port.postMessage({ pcm: this.out, level }, [this.out.buffer]);
        this.out = new Int16Array(this.chunk);
        this.outLen = 0;
        this.sumSq = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm16k", Pcm16k);
