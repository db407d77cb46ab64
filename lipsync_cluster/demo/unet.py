"""The SyncTalk_2D 328 UNet topology with deterministic random weights, built with ``onnx.helper``.

Same I/O as the real export and as :mod:`lipsync_cluster.demo.light`: ``input`` [B,6,320,320],
``audio`` [B,32,16,16] -> ``output`` [B,3,320,320] (sigmoid, BGR). It has the real network's
shape and cost (about 12 M parameters, the same convolutions at the same resolutions), so it
is the model to load-test and benchmark with; its pictures are noise-like textures, not faces.

Topology (``ch = [32, 64, 128, 256, 512]``, every ``IR`` an inverted residual block:
1x1 expand -> ReLU -> 3x3 depthwise -> ReLU -> 1x1 project, BatchNorm folded into each conv's
weights and bias; ``DC(i, o, s)`` = ``IR(i, o, stride s, x2)`` + ``IR(o, o, residual, x2)``)::

    x1 = IR(6, 32, x2)                      320x320   (input block)
    x2 = DC(32, 64, 2)                      160x160
    x3 = DC(64, 128, 2)                      80x80
    x4 = DC(128, 256, 2)                     40x40
    x5 = DC(256, 512, 2)                     20x20
    a  = audio branch (AVE): IR(32,64) IR(64,128) Conv3x3(128,256)+ReLU IR(256,256,res)
         Conv3x3(256,512)+ReLU IR(512,512,res) IR(512,512,res)   at 16x16, then Resize -> 20x20
    f  = DC(1024, 512, 1) DC(512, 256, 1) on concat(x5, a)        (fuse)
    u1 = DC(512, 128, 1) on concat(x4, up2(f))                    40x40
    u2 = DC(256, 64, 1)  on concat(x3, up2(u1))                   80x80
    u3 = DC(128, 32, 1)  on concat(x2, up2(u2))                   160x160
    u4 = DC(64, 32, 1)   on concat(x1, up2(u3))                   320x320
    out = sigmoid(Conv1x1(32, 3)(u4))

``up2`` is a bilinear x2 Resize with ``align_corners`` (``nn.Upsample(scale_factor=2,
mode='bilinear', align_corners=True)``). The original pads the audio to 20x20 inside its last
convolution; here, as specified for the demo, the branch ends in a bilinear Resize to 20x20.

Weights: ``numpy.random.RandomState(seed)``, He-scaled (std sqrt(2 / fan_in)) before a ReLU,
sqrt(1 / fan_in) on linear projections, residual branches scaled by 1/2, small random biases
(the folded BatchNorm shift). The output conv's folded BatchNorm uses the statistics of its input
features on a fixed calibration batch (two demo face crops), as training would: the logits are
centred and their spatial std is ~1, so outputs spread over (0, 1), neither stuck at 0.5 nor
saturated, and the skip connections keep a ghost of the input face visible in them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
CROP = 320
CHANNELS = (32, 64, 128, 256, 512)
INPUT_NAME, AUDIO_NAME, OUTPUT_NAME = "input", "audio", "output"
_LOGIT_STD = 1.0  # target spatial std of the pre-sigmoid output on face crops


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.RandomState(seed % (2**32))
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.params = 0
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, name: str, value: np.ndarray) -> str:
        self.params += int(value.size)
        return self.const(name, value.astype(np.float32))

    def node(self, op: str, inputs: list[str], prefix: str, **attrs) -> str:
        out = self.name(prefix)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True,
             gain: float = 1.0, prefix: str = "conv") -> str:
        """A conv with its BatchNorm folded in (weights + bias), optionally followed by ReLU."""
        fan_in = cin // groups * k * k
        std = np.sqrt((2.0 if relu else 1.0) / fan_in) * gain
        w = self.rng.normal(0.0, std, (cout, cin // groups, k, k))
        b = self.rng.normal(0.0, 0.05, cout) * (1.0 if relu else gain)
        base = self.name(prefix)
        y = self.node("Conv", [x, self.weight(base + ".weight", w), self.weight(base + ".bias", b)], prefix,
                      kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=groups)
        return self.node("Relu", [y], prefix + "_relu") if relu else y

    def inverted_residual(self, x: str, cin: int, cout: int, stride: int = 1, residual: bool = False,
                          expand: int = 2) -> str:
        hidden = cin * expand
        h = self.conv(x, cin, hidden, 1, prefix="ir_expand")
        h = self.conv(h, hidden, hidden, 3, stride=stride, groups=hidden, prefix="ir_dw")
        h = self.conv(h, hidden, cout, 1, relu=False, gain=0.5 if residual else 1.0, prefix="ir_project")
        if residual:
            assert cin == cout and stride == 1
            return self.node("Add", [x, h], "ir_add")
        return h

    def double_conv_dw(self, x: str, cin: int, cout: int, stride: int) -> str:
        x = self.inverted_residual(x, cin, cout, stride=stride, residual=False)
        return self.inverted_residual(x, cout, cout, stride=1, residual=True)

    def resize(self, x: str, scale: float, align_corners: bool) -> str:
        scales = self.const(self.name("scales"), np.array([1.0, 1.0, scale, scale], np.float32))
        mode = "align_corners" if align_corners else "half_pixel"
        return self.node("Resize", [x, "", scales], "resize", mode="linear", coordinate_transformation_mode=mode)

    def concat(self, xs: list[str]) -> str:
        return self.node("Concat", xs, "concat", axis=1)


def make_synctalk_unet_model(seed: int = 0) -> tuple[onnx.ModelProto, int]:
    """The UNet as an in-memory ONNX model and its parameter count."""
    b = _Builder(seed)
    ch = CHANNELS
    # encoder
    x1 = b.inverted_residual(INPUT_NAME, 6, ch[0])
    x2 = b.double_conv_dw(x1, ch[0], ch[1], 2)
    x3 = b.double_conv_dw(x2, ch[1], ch[2], 2)
    x4 = b.double_conv_dw(x3, ch[2], ch[3], 2)
    x5 = b.double_conv_dw(x4, ch[3], ch[4], 2)
    # audio branch (AVE): [B,32,16,16] -> [B,512,20,20]
    a = b.inverted_residual(AUDIO_NAME, ch[0], ch[1])
    a = b.inverted_residual(a, ch[1], ch[2])
    a = b.conv(a, ch[2], ch[3], 3, prefix="audio_conv")
    a = b.inverted_residual(a, ch[3], ch[3], residual=True)
    a = b.conv(a, ch[3], ch[4], 3, prefix="audio_conv")
    a = b.inverted_residual(a, ch[4], ch[4], residual=True)
    a = b.inverted_residual(a, ch[4], ch[4], residual=True)
    a = b.resize(a, 20.0 / 16.0, align_corners=False)
    # fuse
    f = b.concat([x5, a])
    f = b.double_conv_dw(f, ch[4] * 2, ch[4], 1)
    f = b.double_conv_dw(f, ch[4], ch[3], 1)
    # decoder
    u = b.double_conv_dw(b.concat([x4, b.resize(f, 2.0, True)]), ch[4], ch[3] // 2, 1)
    u = b.double_conv_dw(b.concat([x3, b.resize(u, 2.0, True)]), ch[3], ch[2] // 2, 1)
    u = b.double_conv_dw(b.concat([x2, b.resize(u, 2.0, True)]), ch[2], ch[1] // 2, 1)
    u = b.double_conv_dw(b.concat([x1, b.resize(u, 2.0, True)]), ch[1], ch[0], 1)
    # The output conv, with its BatchNorm folded in the way training would leave it: statistics of
    # the features it sees (one calibration batch through the body) centre and scale the logits.
    mean, spread = _feature_stats(b, u, ch[0])
    w = b.rng.normal(0.0, 1.0 / np.sqrt(ch[0]), (3, ch[0])) * (_LOGIT_STD / spread)
    bias = -(w @ mean) + b.rng.normal(0.0, 0.1, 3)
    base = "out_conv"
    logits = b.node("Conv", [u, b.weight(base + ".weight", w.reshape(3, ch[0], 1, 1)),
                             b.weight(base + ".bias", bias)], base, kernel_shape=[1, 1])
    b.nodes.append(helper.make_node("Sigmoid", [logits], [OUTPUT_NAME], name="out_sigmoid"))
    model = _model(b, OUTPUT_NAME, 3, f"SyncTalk_2D 328 UNet topology, random weights (seed {seed}, "
                                      f"{b.params} parameters)")
    onnx.checker.check_model(model)
    return model, b.params


def _model(b: _Builder, output: str, channels: int, doc: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        b.nodes, "synctalk2d_unet328_demo",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["B", 6, CROP, CROP]),
         helper.make_tensor_value_info(AUDIO_NAME, TensorProto.FLOAT, ["B", 32, 16, 16])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["B", channels, CROP, CROP])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="lipsync_cluster.demo", doc_string=doc)
    model.ir_version = 8
    return model


def calibration_batch() -> tuple[np.ndarray, np.ndarray]:
    """Two demo face crops (unmasked + masked, /255) and speech-like audio windows."""
    import cv2

    from .frames import PersonRenderer
    from .light import loudness_window

    visuals = []
    for seed in (0, 1):
        img, (x1, y1, x2, y2) = PersonRenderer(seed).frame(0)
        crop = cv2.resize(img[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)[4:324, 4:324]
        v = crop.transpose(2, 0, 1).astype(np.float32) / 255.0
        masked = v.copy()
        masked[:, 5:310, 5:315] = 0.0
        visuals.append(np.concatenate([v, masked]))
    return np.stack(visuals), loudness_window(np.array([0.2, 0.9], np.float32))


def _feature_stats(b: _Builder, features: str, channels: int) -> tuple[np.ndarray, float]:
    """Per-channel mean and the mean spatial std of ``features`` on :func:`calibration_batch`.

    Rounded to 3 decimals so that tiny float differences between machines don't change the file.
    """
    import onnxruntime as ort

    model = _model(b, features, channels, "calibration")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    visual, audio = calibration_batch()
    feats = sess.run(None, {INPUT_NAME: visual, AUDIO_NAME: audio})[0].astype(np.float64)
    mean = np.round(feats.mean(axis=(0, 2, 3)), 3)
    spread = float(np.round(feats.std(axis=(2, 3)).mean(), 3))
    return mean, max(spread, 1e-3)


def build_synctalk_unet(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the demo UNet (float32, ~48 MB) to ``path`` atomically and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model, _ = make_synctalk_unet_model(seed)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)
    return path


def count_parameters(model: onnx.ModelProto | str | os.PathLike) -> int:
    """Number of float weights (conv weights and biases) in an ONNX model."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    total = 0
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT and len(init.dims) >= 1 and not init.name.startswith("scales"):
            n = 1
            for d in init.dims:
                n *= d
            total += n
    return total
