"""``check-model``: what the cluster would load from a package folder, or every problem with it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..common.model_package import (ModelPackageError, bind_unet_io, compute_version, read_package,
                                    validate_package)
from .build import estimate_memory_mb, read_record


def _dims(value_info: Any) -> tuple[list, str]:
    from onnx import TensorProto  # noqa: PLC0415

    tt = value_info.type.tensor_type
    shape: list = []
    if tt.HasField("shape"):
        for d in tt.shape.dim:
            shape.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
    try:
        typ = TensorProto.DataType.Name(tt.elem_type).lower()
    except ValueError:
        typ = f"type {tt.elem_type}"
    return shape, typ


def unet_io(path: Path) -> dict:
    """The UNet's inputs (with the role the worker binds them to) and outputs, from the graph only."""
    import onnx  # noqa: PLC0415

    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    inputs = []
    for vi in model.graph.input:
        if vi.name in weights:
            continue
        shape, typ = _dims(vi)
        inputs.append({"name": vi.name, "shape": shape, "type": typ})
    try:
        visual, audio = bind_unet_io([(i["name"], i["shape"], i["type"]) for i in inputs])
        for i in inputs:
            i["role"] = "visual" if i["name"] == visual else "audio" if i["name"] == audio else None
    except ModelPackageError:
        pass
    outputs = [dict(zip(("name", "shape", "type"), (vo.name, *_dims(vo)))) for vo in model.graph.output]
    return {"file": str(path), "size_mb": round(path.stat().st_size / 2**20, 2), "inputs": inputs, "outputs": outputs}


def check_package(folder: str | Path) -> dict:
    """``{"ok": bool, "problems": [...], "model": {...}}``; never raises for a bad package."""
    folder = Path(folder)
    out: dict[str, Any] = {"package": str(folder), "ok": False, "problems": [], "model": None}
    try:
        pkg = read_package(folder)
    except ModelPackageError as exc:
        out["problems"] = list(exc.problems)
        return out
    problems = validate_package(pkg)
    out["problems"] = problems
    info: dict[str, Any] = {
        "id": pkg.model_id,
        "kind": pkg.kind,
        "version": pkg.version or None,
        "fps": pkg.fps,
        "frame_count": len(pkg.frame_paths),
        "frame_size": list(pkg.frame_size) if pkg.frame_size else None,
        "crop_rects": len(pkg.crop_rects),
        "preload": pkg.preload,
        "memory_estimate_mb": pkg.memory_estimate_mb,
        "memory_estimate_from": "model.yaml" if pkg.memory_estimate_mb is not None else None,
        "unet": None,
    }
    unet = Path(pkg.onnx_path)
    if unet.is_file():
        try:
            info["unet"] = unet_io(unet)
        except Exception:  # noqa: BLE001 - validate_package already names the problem
            info["unet"] = None
    if info["memory_estimate_mb"] is None and pkg.frame_size and pkg.frame_paths:
        info["memory_estimate_mb"] = estimate_memory_mb(len(pkg.frame_paths), pkg.frame_size,
                                                        unet.stat().st_size if unet.is_file() else 0)
        info["memory_estimate_from"] = "frames and UNet size"
    if not problems and not info["version"]:
        info["version"] = compute_version(pkg.onnx_path, pkg.crop_rects_path, pkg.frame_paths)
        info["version_from"] = "content hash"
    record = read_record(folder)
    if record:
        info["prepared"] = {"source": record.get("params", {}).get("source", {}).get("file"),
                            "at": record.get("prepared_at"), "boxes": record.get("boxes_from"),
                            "face": record.get("face")}
    out["model"] = info
    out["ok"] = not problems
    return out


def _shape(shape: list) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def format_check(result: dict) -> str:
    lines = []
    info = result["model"]
    if result["ok"]:
        lines.append(f"✅ {result['package']}: model '{info['id']}' is servable")
    else:
        n = len(result["problems"])
        lines.append(f"❌ {result['package']}: {n} problem(s)")
        lines += [f"  - {p}" for p in result["problems"]]
    if info:
        lines.append("")
        w, h = info["frame_size"] or ("?", "?")
        memory = info["memory_estimate_mb"]
        lines += [f"  id:              {info['id']}",
                  f"  version:         {info['version'] or '-'}",
                  f"  kind:            {info['kind'] or '-'}",
                  f"  frames:          {info['frame_count']:,} at {w}x{h}, {info['fps']:g} fps",
                  f"  crop rects:      {info['crop_rects']:,}",
                  "  memory estimate: " + (f"{memory:,.1f} MB ({info['memory_estimate_from']})" if memory is not None
                                            else "-"),
                  f"  preload:         {'yes' if info['preload'] else 'no'}"]
        unet = info.get("unet")
        if unet:
            lines.append(f"  UNet:            {unet['file']} ({unet['size_mb']:.2f} MB)")
            for i in unet["inputs"]:
                role = f"  -> {i['role']}" if i.get("role") else ""
                lines.append(f"    input  {i['name']!r:<16} {_shape(i['shape']):<18} {i['type']}{role}")
            for o in unet["outputs"]:
                lines.append(f"    output {o['name']!r:<16} {_shape(o['shape']):<18} {o['type']}")
        else:
            lines.append("  UNet:            -")
        prepared = info.get("prepared")
        if prepared:
            lines.append(f"  prepared from:   {prepared['source']} at {prepared['at']} (boxes: {prepared['boxes']})")
    return "\n".join(lines)
