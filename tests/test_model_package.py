"""Model packages: reading both forms, and every validation error with its message."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper

from lipsync_cluster.common import model_package as mp
from lipsync_cluster.common.errors import ModelLoadFailed
from lipsync_cluster.config.schema import ModelEntry

W, H, N = 320, 240, 12


def make_unet(path: Path, visual: str = "input", audio: str = "audio", output: str = "output",
              visual_shape: tuple = ("B", 6, 320, 320), audio_shape: tuple = ("B", 32, 16, 16),
              output_shape: tuple = ("B", 3, 320, 320), dtype: int = TensorProto.FLOAT,
              swap_order: bool = False, extra_input: bool = False) -> Path:
    """A tiny runnable UNet stand-in: sigmoid(visual[:, :3] + mean(audio))."""
    vi = helper.make_tensor_value_info(visual, dtype, list(visual_shape))
    ai = helper.make_tensor_value_info(audio, dtype, list(audio_shape))
    oi = helper.make_tensor_value_info(output, dtype, list(output_shape))
    inits = [helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
             helper.make_tensor("ends", TensorProto.INT64, [1], [3]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    nodes = [helper.make_node("Slice", [visual, "starts", "ends", "axes"], ["face"]),
             helper.make_node("ReduceMean", [audio], ["level"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Add", ["face", "level"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], [output])]
    inputs = [ai, vi] if swap_order else [vi, ai]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, 320, 320]))
    graph = helper.make_graph(nodes, "tiny_unet", inputs, [oi], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # old enough for any onnxruntime this project supports
    onnx.save(model, str(path))
    return path


def make_frames(folder: Path, n: int = N, names: str = "frame_{:04d}.jpg", size: tuple = (W, H)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    paths = []
    for i in range(n):
        img = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        cv2.putText(img, str(i), (20, 60), cv2.FONT_HERSHEY_SIMPLEX, 2, (255, 255, 255), 3)
        path = folder / names.format(i)
        assert cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def rects_list(n: int = N) -> list[list[int]]:
    return [[40 + i, 30, 200 + i, 210] for i in range(n)]


def make_package(root: Path, model_id: str = "alice", n_frames: int = N, n_rects: Optional[int] = None,
                 map_form: bool = False, manifest: Optional[dict[str, Any]] = None, **unet: Any) -> Path:
    folder = root / model_id
    make_frames(folder / "frames", n_frames)
    make_unet(folder / "model.onnx", **unet)
    rects = rects_list(n_frames if n_rects is None else n_rects)
    data: Any = {str(i): {"rect": r, "landmarks": []} for i, r in enumerate(rects)} if map_form else rects
    (folder / "crop_rects.json").write_text(json.dumps(data))
    doc = {"id": model_id, "onnx": "model.onnx", "frames": "frames", "crop_rects": "crop_rects.json", "fps": 25}
    doc.update(manifest or {})
    (folder / "model.yaml").write_text(yaml.safe_dump({k: v for k, v in doc.items() if v is not None}))
    return folder


def problems_of(folder: Path, model_id: Optional[str] = None) -> list[str]:
    with pytest.raises(mp.ModelPackageError) as info:
        mp.load_package(folder, model_id)
    err = info.value
    assert isinstance(err, ModelLoadFailed) and err.code == "model_load_failed"
    assert err.problems and err.problems[0] in err.message
    assert err.to_wire()["details"]["problems"] == err.problems
    return err.problems


def has(problems: list[str], *parts: str) -> bool:
    return any(all(p in msg for p in parts) for msg in problems)


# --- good packages ---------------------------------------------------------------------


def test_load_good_package(tmp_path):
    folder = make_package(tmp_path, manifest={"kind": "light", "preload": True, "memory_estimate_mb": 120})
    pkg = mp.load_package(folder)
    assert pkg.model_id == "alice" and pkg.kind == "light" and pkg.preload is True
    assert pkg.memory_estimate_mb == 120.0 and pkg.audio_encoder_path is None
    assert pkg.source == str(folder.resolve())
    assert pkg.num_frames == N and [p.name for p in pkg.frame_paths] == [f"frame_{i:04d}.jpg" for i in range(N)]
    assert pkg.crop_rects.dtype == np.int32 and pkg.crop_rects.tolist() == rects_list()
    assert pkg.frame_size == (W, H) and pkg.fps == 25.0
    assert pkg.frames_bytes() == N * W * H * 3
    # No version in the manifest: the content hash, exactly as compute_version gives it.
    assert pkg.version == mp.compute_version(folder / "model.onnx", folder / "crop_rects.json", pkg.frame_paths)
    assert len(pkg.version) == 16
    assert mp.validate_package(pkg) == []


def test_manifest_version_is_trusted_and_content_hash_tracks_changes(tmp_path):
    folder = make_package(tmp_path, manifest={"version": "v2.1-beta"})
    assert mp.load_package(folder).version == "v2.1-beta"
    other = make_package(tmp_path, "bob")
    before = mp.load_package(other).version
    cv2.imwrite(str(other / "frames" / "frame_0003.jpg"), np.zeros((H, W, 3), np.uint8))
    assert mp.load_package(other).version != before


def test_map_form_equals_list_form_and_is_ordered_by_number(tmp_path):
    folder = make_package(tmp_path, map_form=True)
    data = json.loads((folder / "crop_rects.json").read_text())
    # Write the keys out of order (and a bare-list value): the int key decides the order.
    shuffled = {k: data[k] for k in sorted(data, reverse=True)}
    shuffled["3"] = data["3"]["rect"]
    (folder / "crop_rects.json").write_text(json.dumps(shuffled))
    assert mp.read_crop_rects(folder / "crop_rects.json").tolist() == rects_list()
    assert mp.load_package(folder).crop_rects.tolist() == rects_list()


def test_crop_rect_file_errors(tmp_path):
    path = tmp_path / "rects.json"
    data = {str(i): {"rect": r} for i, r in enumerate(rects_list(6))}
    del data["2"]
    path.write_text(json.dumps(data))
    with pytest.raises(mp.ModelPackageError, match=r"rects.json: no rect for frame 2 \(keys run 0\.\.5\)"):
        mp.read_crop_rects(path)
    path.write_text(json.dumps({"1": [0, 0, 5, 5], "2": [0, 0, 5, 5]}))
    with pytest.raises(mp.ModelPackageError, match="no rect for frame 0"):
        mp.read_crop_rects(path)
    path.write_text(json.dumps([[0, 0, 5, 5], [0, 0, 5]]))
    with pytest.raises(mp.ModelPackageError, match=r"rect for frame 1 is \[0, 0, 5\]; expected 4 integers"):
        mp.read_crop_rects(path)
    path.write_text(json.dumps([[0, 0, 5.5, 5]]))
    with pytest.raises(mp.ModelPackageError, match="rect for frame 0"):
        mp.read_crop_rects(path)
    path.write_text(json.dumps([[0.0, 0, 5.0, 5]]))  # integral floats are fine
    assert mp.read_crop_rects(path).tolist() == [[0, 0, 5, 5]]
    path.write_text(json.dumps({"a": [0, 0, 5, 5]}))
    with pytest.raises(mp.ModelPackageError, match="key 'a' is not a frame number"):
        mp.read_crop_rects(path)
    path.write_text("{not json")
    with pytest.raises(mp.ModelPackageError, match="rects.json: not valid JSON"):
        mp.read_crop_rects(path)
    with pytest.raises(mp.ModelPackageError, match="nope.json: file not found"):
        mp.read_crop_rects(tmp_path / "nope.json")


def test_other_frame_names_sort_by_number(tmp_path):
    folder = tmp_path / "f"
    make_frames(folder, 12, names="{}.png")  # 0.png .. 11.png: by name 10 < 2, by number not
    assert [p.name for p in mp.list_frame_files(folder)] == [f"{i}.png" for i in range(12)]
    unpadded = tmp_path / "g"
    make_frames(unpadded, 11, names="frame_{}.jpg")
    (unpadded / "cover.png").write_bytes(b"x")  # not a frame_* file: ignored beside frame_* files
    assert [p.name for p in mp.list_frame_files(unpadded)] == [f"frame_{i}.jpg" for i in range(11)]


def test_frame_gaps_and_duplicates(tmp_path):
    folder = tmp_path / "f"
    make_frames(folder, 5)
    (folder / "frame_0002.jpg").unlink()
    with pytest.raises(mp.ModelPackageError, match=r"has no frame 2 \(between frame_0001.jpg and frame_0003.jpg\)"):
        mp.list_frame_files(folder)
    make_frames(folder, 3)
    cv2.imwrite(str(folder / "frame_0001.png"), np.zeros((H, W, 3), np.uint8))
    with pytest.raises(mp.ModelPackageError, match="two files for frame 1: frame_0001.jpg, frame_0001.png"):
        mp.list_frame_files(folder)


# --- validation errors -----------------------------------------------------------------


def test_rect_count_differs_from_frame_count(tmp_path):
    problems = problems_of(make_package(tmp_path, n_frames=10, n_rects=12))
    assert has(problems, "crop_rects.json has 12 rects but frames/ has 10 frames: expected 12 frames, found 10")


def test_declared_frame_count_disagrees(tmp_path):
    problems = problems_of(make_package(tmp_path, manifest={"frame_count": 13}))
    assert has(problems, "model.yaml frame_count is 13 but frames/ has 12 frames")


def test_bad_rects_name_the_rect_and_the_frame(tmp_path):
    folder = make_package(tmp_path)
    rects = rects_list()
    rects[3] = [300, 10, 400, 100]
    rects[5] = [50, 60, 50, 100]
    rects[7] = [-1, 0, 10, 10]
    (folder / "crop_rects.json").write_text(json.dumps(rects))
    problems = problems_of(folder)
    assert has(problems, "crop_rects.json: rect 3 [300, 10, 400, 100] lies outside the 320x240 frame")
    assert has(problems, "crop_rects.json: rect 5 [50, 60, 50, 100] is empty (needs x1 < x2 and y1 < y2)")
    assert has(problems, "rect 7 [-1, 0, 10, 10] lies outside")
    assert len(problems) == 3


def test_declared_frame_size_is_used_for_bounds_and_checked(tmp_path):
    problems = problems_of(make_package(tmp_path, manifest={"frame_size": [160, 120]}))
    assert has(problems, "rect 0 [40, 30, 200, 210] lies outside the 160x120 frame")
    assert has(problems, "frames/frame_0000.jpg is 320x240 but model.yaml frame_size is 160x120")


def test_missing_files_and_folders(tmp_path):
    folder = make_package(tmp_path, manifest={"audio_encoder": "enc.onnx"})
    (folder / "model.onnx").unlink()
    (folder / "crop_rects.json").unlink()
    problems = problems_of(folder)
    assert has(problems, "model.onnx: UNet file not found")
    assert has(problems, "crop_rects.json: file not found")
    assert has(problems, "enc.onnx: audio encoder file not found")
    other = make_package(tmp_path, "bob", manifest={"frames": "bg"})
    assert has(problems_of(other), "bg/: frames folder not found")
    empty = make_package(tmp_path, "carol")
    for p in (empty / "frames").iterdir():
        p.unlink()
    assert has(problems_of(empty), "frames/ has no frames")
    (tmp_path / "dave").mkdir()
    with pytest.raises(mp.ModelPackageError, match="dave/model.yaml: not found"):
        mp.load_package(tmp_path / "dave")
    with pytest.raises(mp.ModelPackageError, match="model package folder not found"):
        mp.load_package(tmp_path / "nowhere")


def test_unreadable_and_mis_sized_frames(tmp_path):
    folder = make_package(tmp_path)
    (folder / "frames" / f"frame_{N - 1:04d}.jpg").write_bytes(b"not a jpeg")
    assert has(problems_of(folder), f"frames/frame_{N - 1:04d}.jpg: cannot be decoded as an image")
    other = make_package(tmp_path, "bob")
    cv2.imwrite(str(other / "frames" / f"frame_{N - 1:04d}.jpg"), np.zeros((120, 160, 3), np.uint8))
    assert has(problems_of(other), f"frames/frame_{N - 1:04d}.jpg is 160x120 but the first frame frame_0000.jpg is 320x240")
    # Without the frame check the package loads (the frame store decodes everything later).
    assert mp.load_package(other, check_frames=False).num_frames == N


def test_onnx_not_loadable(tmp_path):
    folder = make_package(tmp_path)
    (folder / "model.onnx").write_bytes(b"\x00garbage\xff" * 10)
    assert has(problems_of(folder), "model.onnx: not a loadable ONNX model")
    (folder / "model.onnx").write_bytes(b"")
    assert has(problems_of(folder), "model.onnx: not a loadable ONNX model")


@pytest.mark.parametrize("unet,expected", [
    (dict(visual_shape=("B", 6, 256, 256)), "the UNet's inputs are 'input' [B,6,256,256], 'audio' [B,32,16,16]; "
                                            "expected a visual input [B,6,320,320] and an audio input [B,32,16,16]"),
    (dict(audio_shape=("B", 32, 16)), "'audio' [B,32,16]; expected a visual input"),
    (dict(extra_input=True), "the UNet has 3 input(s)"),
    (dict(output_shape=("B", 3, 328, 328)), "the UNet's outputs are 'output' [B,3,328,328]; expected one output [B,3,320,320]"),
    (dict(dtype=TensorProto.FLOAT16), "the UNet's input 'input' is tensor(float16)"),
    (dict(visual_shape=("B", "C", "H", "W"), audio_shape=("B", "C2", "H2", "W2"), visual="x", audio="y"),
     "are ambiguous"),
])
def test_onnx_io_problems(tmp_path, unet, expected):
    problems = problems_of(make_package(tmp_path, **unet))
    assert has(problems, "model.onnx: ", expected), problems


def test_manifest_field_problems(tmp_path):
    folder = make_package(tmp_path, manifest={"fps": "fast", "crop_rect": "x.json", "preload": "yes",
                                              "frame_size": [320], "version": "a/b"})
    problems = problems_of(folder)
    assert has(problems, "model.yaml: field 'fps' is 'fast'; expected a positive number")
    assert has(problems, "model.yaml: unknown key 'crop_rect'; known keys: id, onnx")
    assert has(problems, "model.yaml: field 'preload' is 'yes'; expected true or false")
    assert has(problems, "model.yaml: field 'frame_size' is [320]; expected [width, height]")
    assert has(problems, "model.yaml: field 'version' is 'a/b'")
    bad_id = make_package(tmp_path, "eve", manifest={"id": "Eve Smith"})
    with pytest.raises(mp.ModelPackageError, match=r"model.yaml: id is 'Eve Smith', not a valid model id .*try 'eve_smith'"):
        mp.load_package(bad_id)
    assert has(problems_of(make_package(tmp_path, "frank"), "george"),
               "model.yaml: id is 'frank' but the package is served as 'george'")
    (tmp_path / "frank" / "model.yaml").write_text("id: [unclosed")
    with pytest.raises(mp.ModelPackageError, match="model.yaml: not valid YAML"):
        mp.load_package(tmp_path / "frank")


def test_validate_package_returns_every_problem(tmp_path):
    folder = make_package(tmp_path, n_frames=10, n_rects=12, manifest={"fps": 0}, visual_shape=("B", 6, 1, 1))
    pkg = mp.read_package(folder)
    problems = mp.validate_package(pkg)
    assert has(problems, "fps") and has(problems, "has 12 rects") and has(problems, "model.onnx:")
    assert len(problems) == 3
    assert len(mp.validate_package(pkg, check_onnx=False)) == 2


# --- binding the UNet's inputs by shape --------------------------------------------------


@pytest.mark.parametrize("visual,audio,swap", [
    ("input", "audio", False), ("visual_input", "audio_input", False), ("y", "x", True), ("a", "b", True)])
def test_bind_by_shape_with_any_names_on_a_real_session(tmp_path, visual, audio, swap):
    path = make_unet(tmp_path / "m.onnx", visual=visual, audio=audio, output="pred", swap_order=swap)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    v_name, a_name = mp.bind_unet_io(sess.get_inputs())
    assert (v_name, a_name) == (visual, audio)
    out = sess.run(None, {v_name: np.zeros((2, 6, 320, 320), np.float32),
                          a_name: np.zeros((2, 32, 16, 16), np.float32)})[0]
    assert out.shape == (2, 3, 320, 320) and np.allclose(out, 0.5)
    assert mp.check_unet_onnx(path) == []


def test_bind_symbolic_shapes_and_errors():
    # Fully symbolic: the shapes cannot decide, the conventional names can.
    assert mp.bind_unet_io([("audio_input", ["B", "C", "H", "W"], None),
                            ("visual_input", ["B", "C", "H", "W"], None)]) == ("visual_input", "audio_input")
    # One fixed, one symbolic: the fixed one decides.
    assert mp.bind_unet_io([("p", [None, 32, 16, 16]), ("q", ["N", None, None, None])]) == ("q", "p")
    with pytest.raises(mp.ModelPackageError, match="ambiguous"):
        mp.bind_unet_io([("p", ["B", "C", "H", "W"]), ("q", ["B", "C", "H", "W"])])
    with pytest.raises(mp.ModelPackageError, match=r"has 1 input\(s\) \('input' \[B,6,320,320\]\)"):
        mp.bind_unet_io([("input", ["B", 6, 320, 320])])
    with pytest.raises(mp.ModelPackageError, match="expected a visual input"):
        mp.bind_unet_io([("input", ["B", 6, 320, 320]), ("audio", ["B", 6, 320, 320])])


# --- the explicit config form ----------------------------------------------------------


def test_package_from_entry_explicit_form(tmp_path):
    root = tmp_path / "explicit"
    make_frames(root / "bg", 12, names="{}.jpg")
    make_unet(root / "unet.onnx", visual="visual_input", audio="audio_input")
    (root / "rects.json").write_text(json.dumps({str(i): {"rect": r} for i, r in enumerate(rects_list())}))
    entry = ModelEntry(model_path=str(root / "unet.onnx"), background_dir=str(root / "bg"),
                       crop_rects_path=str(root / "rects.json"), num_frames=12, preload=True,
                       memory_estimate_mb=300)
    pkg = mp.package_from_entry("explicit_model", entry)
    assert pkg.source == "config" and pkg.model_id == "explicit_model" and pkg.kind is None
    assert pkg.num_frames == 12 and pkg.frame_paths[10].name == "10.jpg"
    assert pkg.preload and pkg.memory_estimate_mb == 300.0 and pkg.frame_size == (W, H)
    assert pkg.version == mp.compute_version(root / "unet.onnx", root / "rects.json", pkg.frame_paths)
    entry.num_frames = 20
    with pytest.raises(mp.ModelPackageError, match="models.explicit_model.num_frames is 20 but .*/bg/ has 12 frames"):
        mp.package_from_entry("explicit_model", entry)
    entry.num_frames, entry.background_dir = None, str(root / "missing")
    with pytest.raises(mp.ModelPackageError, match="missing/: frames folder not found"):
        mp.package_from_entry("explicit_model", entry)
    with pytest.raises(mp.ModelPackageError, match="models.explicit_model.crop_rects_path: required"):
        mp.package_from_entry("explicit_model", ModelEntry(model_path="x.onnx", background_dir="bg"))


def test_package_from_entry_package_form_with_overrides(tmp_path):
    folder = make_package(tmp_path)
    pkg = mp.package_from_entry("alice", ModelEntry(package=str(folder), preload=True, memory_estimate_mb=64, fps=30))
    assert pkg.source == str(folder.resolve()) and pkg.preload and pkg.memory_estimate_mb == 64 and pkg.fps == 30
    with pytest.raises(mp.ModelPackageError, match="id is 'alice' but the package is served as 'bob'"):
        mp.package_from_entry("bob", ModelEntry(package=str(folder)))
    with pytest.raises(mp.ModelPackageError, match="models.alice.num_frames is 5 but frames/ has 12"):
        mp.package_from_entry("alice", ModelEntry(package=str(folder), num_frames=5))


# --- scanning a models_dir -------------------------------------------------------------


def test_scan_reports_broken_packages_beside_good_ones(tmp_path):
    make_package(tmp_path, "alice")
    make_package(tmp_path, "bob", manifest={"version": "1"})
    broken = make_package(tmp_path, "carol")
    (broken / "crop_rects.json").write_text(json.dumps(rects_list(3)))
    make_package(tmp_path, "Dave Jones", manifest={"id": "dave_jones"})
    make_package(tmp_path, "erin", manifest={"id": "someone_else"})
    (tmp_path / "notes").mkdir()  # no model.yaml: not a model
    (tmp_path / "README.txt").write_text("hi")
    found = mp.scan_models_dir(tmp_path)
    assert sorted(found) == ["Dave Jones", "alice", "bob", "carol", "erin"]
    assert isinstance(found["alice"], mp.ModelPackage) and isinstance(found["bob"], mp.ModelPackage)
    assert found["bob"].version == "1"
    assert "crop_rects.json has 3 rects but frames/ has 12 frames" in found["carol"].message
    assert "the folder name is 'Dave Jones', not a valid model id" in found["Dave Jones"].message
    assert "try 'dave_jones'" in found["Dave Jones"].message
    assert "id is 'someone_else' but the folder is named 'erin'" in found["erin"].message
    with pytest.raises(mp.ModelPackageError, match="models_dir .*: folder not found"):
        mp.scan_models_dir(tmp_path / "missing")


def test_model_ids():
    assert mp.suggest_model_id("Person 1") == "person_1"
    assert mp.suggest_model_id("  Zoë -- Dr. Who!! ") == "zoe_dr_who"
    assert mp.suggest_model_id("!!!") == "model"
    assert len(mp.suggest_model_id("x" * 100)) == 64
    for name in ("Person 1", "Zoë", "a" * 80, "__x__"):
        assert mp.is_valid_model_id(mp.suggest_model_id(name))
    assert mp.is_valid_model_id("alice_2") and mp.is_valid_model_id("0a")
    for bad in ("", "_a", "Alice", "a-b", "a" * 65, "alice\n", None, 3):
        assert not mp.is_valid_model_id(bad)


# --- package authors are not trusted with the host (docs/SECURITY.md) --------------------


@pytest.mark.parametrize("victim", ["crop_rects.json", "model.onnx", "frames/frame_0003.jpg", "frames", "model.yaml"])
def test_a_symlink_out_of_the_package_is_refused_before_it_is_read(tmp_path, victim):
    folder = make_package(tmp_path / "models")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "host.json").write_text(json.dumps([[1, 2, 3, "SECRET-TOKEN"]]))
    target = folder / victim
    if target.is_dir():
        shutil.copytree(target, secret / "frames")
        shutil.rmtree(target)
        target.symlink_to(secret / "frames")
    else:
        target.unlink()
        target.symlink_to(secret / "host.json")
    with pytest.raises(mp.ModelPackageError) as info:
        mp.load_package(folder)
    assert "leads outside the package folder" in info.value.message
    assert "SECRET-TOKEN" not in info.value.message and str(secret) not in info.value.message
    # A symlink that stays inside the package is fine.
    target.unlink()
    inner = folder / "inner"
    inner.mkdir()
    if victim == "frames":
        make_frames(inner / "frames")
        target.symlink_to(inner / "frames")
    else:
        writers = {"crop_rects.json": lambda p: p.write_text(json.dumps(rects_list())),
                   "model.onnx": make_unet,
                   "frames/frame_0003.jpg": lambda p: cv2.imwrite(str(p), np.zeros((H, W, 3), np.uint8)),
                   "model.yaml": lambda p: p.write_text(yaml.safe_dump({"id": "alice"}))}
        writers[victim](inner / "x.jpg")
        target.symlink_to(inner / "x.jpg")
    assert mp.load_package(folder).model_id == "alice"


def test_public_reason_keeps_server_paths_to_itself():
    text = ("model 'alice' (/srv/secret/models/alice): frames/frame_0001.jpg: file not found; "
            "/srv/secret/models/alice/model.onnx: not a loadable ONNX model " + "x" * 400)
    short = mp.public_reason(text)
    assert "/srv" not in short and "model.onnx" in short and "frames/frame_0001.jpg" in short
    assert len(short) <= mp.MAX_REASON_CHARS


def png_bomb(path: Path, w: int, h: int) -> Path:
    """A grayscale PNG of w x h zeros: a few dozen KB on disk, w*h*3 bytes once decoded in color."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (w + 1)  # filter byte + pixels
    body = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.mark.processes
def test_an_image_bomb_is_refused_from_its_header(tmp_path):
    """A package whose frames are 8000x8000 PNGs of a few dozen KB: the scan reads the sizes from
    the headers and refuses the frames without decoding them (memory of the scanning process flat)."""
    folder = make_package(tmp_path, n_frames=2)
    for p in sorted((folder / "frames").iterdir()):
        p.unlink()
        png_bomb(p.with_suffix(".png"), 8000, 8000)
    code = f"""
import resource, sys
sys.path.insert(0, {str(Path(mp.__file__).parents[2])!r})
from lipsync_cluster.common import model_package as mp
import cv2, PIL.Image  # the imports' own memory is not the scan's
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    mp.load_package({str(folder)!r}, check_onnx=False)
    print("loaded")
except mp.ModelPackageError as exc:
    print(exc.message)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    message, grew_mb = out.stdout.strip().rsplit("\n", 1)
    assert "8000x8000" in message and "at most" in message, out.stdout + out.stderr
    assert int(grew_mb) < 40, f"the scan decoded the bomb: its peak memory grew {grew_mb} MB"
