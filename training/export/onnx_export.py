"""Export a trained torch module into model_store/<name>/<version>/ as ONNX.

One call does the whole stage (DESIGN.md rule 8): ONNX export with dynamic batch/height/width axes, parity
against torch at two spatial sizes and two batch sizes through real ONNX Runtime, sha256, manifest.yaml exactly
per notes/MANIFEST.md, and MODEL_CARD.md (+ samples.png). Everything is written into a temporary sibling
directory first and renamed at the end, so a failed parity check never leaves a half-written version behind.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import yaml

from services.core.model_store import file_sha256

ONNX_OPSET = 18
MODEL_KINDS = ("refiner", "renderer", "patch_generator", "encoder", "segmenter", "denoiser", "test")
LICENCE_NOTE = (
    "Trained on non-commercial research data (see the data section and shared/data/DATA.md): "
    "the weights inherit those terms. Research use only; not for commercial use or clinical decisions."
)


# (batch, height, width, generator) -> model inputs; for models whose inputs are not NCHW images (latents, ids)
ParityInputs = Callable[[int, int, int, torch.Generator], tuple[torch.Tensor, ...]]


class ParityError(AssertionError):
    """ONNX Runtime output differs from torch by more than the stated tolerance."""


@dataclass(frozen=True)
class ParityResult:
    height: int
    width: int
    batch: int
    max_abs: float
    mean_abs: float


@dataclass(frozen=True)
class ModelCard:
    """Human-readable facts for MODEL_CARD.md that the manifest does not carry."""

    title: str
    summary: str
    data: str  # which datasets/splits, how labels were derived
    intended_use: str
    limitations: str
    losses: Mapping[str, float] = field(default_factory=dict)  # final (smoothed) training losses
    licence: str = LICENCE_NOTE
    extra_sections: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- provenance helpers
def hardware_string() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{os.cpu_count()}-core {cpu} CPU (torch threads {torch.get_num_threads()}), torch {torch.__version__}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------- export + parity
def _export_onnx(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], path: Path,
                 input_names: Sequence[str], output_names: Sequence[str],
                 dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    # The TorchScript-tracing exporter keeps every axis named in dynamic_axes symbolic whatever the example size;
    # the dynamo exporter specialised H/W of the U-Net to a 256x256 example (PERF-NOTES), so it is not used here.
    torch.onnx.export(
        module, example_inputs, str(path), dynamo=False, opset_version=ONNX_OPSET,
        input_names=list(input_names), output_names=list(output_names),
        dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()}, do_constant_folding=True,
    )


def _onnx_io_shapes(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read names/dtypes/shapes back from the exported graph (dim_param strings = dynamic axes)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model)
    initializers = {init.name for init in model.graph.initializer}

    def describe(values) -> list[dict[str, Any]]:
        out = []
        for value in values:
            if value.name in initializers:
                continue
            tensor_type = value.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
            shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tensor_type.shape.dim]
            out.append({"name": value.name, "dtype": dtype, "shape": shape})
        return out

    return describe(model.graph.input), describe(model.graph.output)


def _resized_inputs(example_inputs: tuple[torch.Tensor, ...], batch: int, height: int, width: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    # Inputs are NCHW images/label maps; values in [-1, 1] exercise every channel of a one-hot/noise/edge input.
    return tuple(torch.rand((batch, x.shape[1], height, width), generator=generator, dtype=x.dtype) * 2 - 1
                 for x in example_inputs)


def check_parity(module: torch.nn.Module, onnx_path: Path, example_inputs: tuple[torch.Tensor, ...],
                 input_names: Sequence[str], sizes: Sequence[tuple[int, int]], batches: Sequence[int] = (1, 3),
                 atol: float = 1e-3, seed: int = 0, parity_inputs: ParityInputs | None = None) -> list[ParityResult]:
    """Run torch and ONNX Runtime (CPU, graph optimisation ALL) on the same random inputs; raise above atol.

    Default inputs: uniform [-1, 1] NCHW tensors with the example's channel count; pass parity_inputs for
    models whose inputs are something else (latent vectors, integer class ids)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    results = []
    module = module.eval()
    for height, width in sizes:
        for batch in batches:
            inputs = (parity_inputs(batch, height, width, generator) if parity_inputs is not None
                      else _resized_inputs(example_inputs, batch, height, width, generator))
            with torch.inference_mode():
                expected = module(*inputs)
            expected = expected[0] if isinstance(expected, (tuple, list)) else expected
            got = session.run(None, {n: x.numpy() for n, x in zip(input_names, inputs)})[0]
            if got.shape != tuple(expected.shape):
                raise ParityError(f"ONNX output shape {got.shape} != torch {tuple(expected.shape)} "
                                  f"for input batch={batch} size={height}x{width} ({onnx_path})")
            err = np.abs(got - expected.float().numpy())
            results.append(ParityResult(height, width, batch, float(err.max()), float(err.mean())))
    worst = max(results, key=lambda r: r.max_abs)
    if worst.max_abs > atol:
        raise ParityError(f"ONNX/torch max abs error {worst.max_abs:.3g} > atol {atol:g} at batch={worst.batch} "
                          f"size={worst.height}x{worst.width} ({onnx_path})")
    return results


# --------------------------------------------------------------------------------------------- model card
def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def render_model_card(manifest: Mapping[str, Any], card: ModelCard, parity: Sequence[ParityResult],
                      has_samples: bool) -> str:
    prov = manifest["provenance"]
    lines = [
        f"# {manifest['name']} v{manifest['version']} — {card.title}", "",
        card.summary, "",
        "## Data", "", card.data, "",
        f"Datasets: {', '.join(map(str, prov['data'])) if isinstance(prov['data'], list) else prov['data']}.", "",
        "## Licence", "", card.licence, "",
        "## Training", "",
        f"- steps: {prov['steps']}",
        f"- train time: {prov['train_seconds']:.0f} s ({prov['train_seconds'] / 3600:.2f} h)",
        f"- hardware: {prov['hardware']}",
        f"- seed: {prov['seed']}",
        f"- training commit: `{prov['training_commit']}`",
        f"- created: {prov['created']}", "",
    ]
    if card.losses:
        lines += ["Final training losses (mean over the last logged steps):", "", "| loss | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in card.losses.items()]
        lines.append("")
    inputs = ", ".join(f"`{i['name']}` {i['dtype']} {i['shape']}" for i in manifest["inputs"])
    outputs = ", ".join(f"`{o['name']}` {o['dtype']} {o['shape']}" for o in manifest["outputs"])
    lines += [
        "## Interface", "",
        f"- format: {manifest['format']} (`{manifest['file']}`, sha256 `{manifest['sha256']}`)",
        f"- inputs: {inputs}", f"- outputs: {outputs}", f"- max_batch_size: {manifest['max_batch_size']}",
        "- metadata: " + ", ".join(f"{k}={v}" for k, v in manifest["metadata"].items()), "",
        "## Export parity (ONNX Runtime CPU vs torch, random inputs)", "",
        "| batch | size | max abs | mean abs |", "|---|---|---|---|",
    ]
    lines += [f"| {r.batch} | {r.height}x{r.width} | {r.max_abs:.3g} | {r.mean_abs:.3g} |" for r in parity]
    lines.append("")
    if has_samples:
        lines += ["## Samples", "",
                  "![samples](samples.png)", "",
                  "Columns: input | real | generated, from held-back test-split inputs (never seen in training).", ""]
    lines += ["## Intended use", "", card.intended_use, "",
              "## Limitations", "", card.limitations, ""]
    for title, body in card.extra_sections.items():
        lines += [f"## {title}", "", body, ""]
    lines += ["## Scores", "",
              "Quality scores (FID/KID, precision/recall, segmentation consistency) come from the scoring service "
              "once it is available; none are claimed here.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- public API
def export_to_model_store(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    name: str,
    version: str | int,
    kind: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    metadata: Mapping[str, Any],
    provenance: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    store_root: Path | str = Path("model_store"),
    parity_sizes: Sequence[tuple[int, int]] = ((256, 256), (384, 512)),
    atol: float = 1e-3,
    max_batch_size: int = 8,
    card: ModelCard | None = None,
    samples_png: bytes | Path | None = None,
    overwrite: bool = False,
    parity_inputs: ParityInputs | None = None,
) -> Path:
    """Write model_store/<name>/<version>/{model.onnx, manifest.yaml, MODEL_CARD.md[, samples.png]}.

    provenance must hold training_commit, config, seed, data, steps, train_seconds, hardware; `created` is
    filled in when missing. Returns the version directory. Raises ParityError when ONNX Runtime disagrees
    with torch by more than atol at any of parity_sizes x batch {1, 3}.
    """
    version = str(version)
    if not version.isdigit() or int(version) < 1:
        raise ValueError(f"version must be a positive integer string, got {version!r}")
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid kinds: {', '.join(MODEL_KINDS)}")
    required = ("training_commit", "config", "seed", "data", "steps", "train_seconds", "hardware")
    missing = [k for k in required if k not in provenance]
    if missing:
        raise ValueError(f"provenance for {name} misses {missing}; required: {list(required)}")
    if len(example_inputs) != len(input_names):
        raise ValueError(f"{len(example_inputs)} example inputs but input_names={list(input_names)}")

    store_root = Path(store_root)
    final_dir = store_root / name / version
    if final_dir.exists() and not overwrite:
        raise FileExistsError(f"{final_dir} already exists; pick a new version or pass overwrite=True")
    (store_root / name).mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=store_root / name))
    try:
        module = module.eval().float().to(memory_format=torch.contiguous_format)
        onnx_path = work_dir / "model.onnx"
        _export_onnx(module, example_inputs, onnx_path, input_names, output_names, dynamic_axes)
        inputs, outputs = _onnx_io_shapes(onnx_path)
        parity = check_parity(module, onnx_path, example_inputs, input_names, parity_sizes,
                              batches=(1, min(3, max_batch_size)), atol=atol, parity_inputs=parity_inputs)

        manifest = {
            "name": name,
            "version": version,
            "kind": kind,
            "format": "onnx",
            "file": "model.onnx",
            "sha256": file_sha256(onnx_path),
            "max_batch_size": int(max_batch_size),
            "inputs": inputs,
            "outputs": outputs,
            "metadata": dict(metadata),
            "provenance": {**dict(provenance), "created": provenance.get("created") or utc_now()},
            "metrics": {
                "onnx_parity_max_abs": max(r.max_abs for r in parity),
                "onnx_parity_mean_abs": float(np.mean([r.mean_abs for r in parity])),
                "onnx_parity_sizes": [[r.batch, r.height, r.width] for r in parity],
                "onnx_parity_atol": atol,
                "onnx_size_bytes": onnx_path.stat().st_size,
                "parameters": int(sum(p.numel() for p in module.parameters())),
                **dict(metrics or {}),
            },
        }
        (work_dir / "manifest.yaml").write_text(yaml.safe_dump(_plain(manifest), sort_keys=False, width=120))
        if samples_png is not None:
            data = samples_png if isinstance(samples_png, bytes) else Path(samples_png).read_bytes()
            (work_dir / "samples.png").write_bytes(data)
        if card is not None:
            (work_dir / "MODEL_CARD.md").write_text(render_model_card(manifest, card, parity, samples_png is not None))

        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.chmod(work_dir, 0o755)
        work_dir.rename(final_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return final_dir


def _plain(value: Any) -> Any:
    """Convert numpy scalars / tuples / Paths so yaml.safe_dump writes plain YAML."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 HxW or HxWx3 array -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
