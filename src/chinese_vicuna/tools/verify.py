"""Model folder checks: a SHA256 manifest, and BOS/EOS/pad ids that agree everywhere.

Wrong special-token ids are why the seed's models never stopped generating (#59, #140): the
tokenizer said one EOS, ``config.json`` or ``generation_config.json`` another. ``check_tokenizer``
compares all three (the tokenizer is taken as the truth, as :func:`~chinese_vicuna.model.load.
fix_special_tokens` does at load time) and says which key of which file to change.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError

MANIFEST = "SHA256SUMS"
SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")


def _folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    return folder


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))


def _hash_all(folder: Path, files: list[Path]) -> dict[str, str]:
    """``relative/path -> sha256`` with one progress bar over all bytes."""
    from tqdm.auto import tqdm

    out = {}
    with tqdm(total=sum(f.stat().st_size for f in files), desc="sha256", unit="B", unit_scale=True) as bar:
        for f in files:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                    bar.update(len(chunk))
            out[f.relative_to(folder).as_posix()] = h.hexdigest()
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_manifest(path: str | os.PathLike) -> tuple[Path, int]:
    """Write ``SHA256SUMS`` (``sha256sum`` format, so ``sha256sum -c SHA256SUMS`` works too)."""
    folder = _folder(path)
    digests = _hash_all(folder, _files(folder))
    _atomic_write(folder / MANIFEST, "".join(f"{h}  {name}\n" for name, h in digests.items()))
    return folder / MANIFEST, len(digests)


@dataclass
class ManifestReport:
    ok_files: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    """Files not in the manifest: reported, not an error (logs, outputs written later)."""

    @property
    def ok(self) -> bool:
        return not self.mismatched and not self.missing

    def lines(self) -> list[str]:
        out = [f"{name}: FAILED (checksum differs)" for name in self.mismatched]
        out += [f"{name}: MISSING" for name in self.missing]
        out += [f"{name}: not in {MANIFEST}" for name in self.extra]
        total = len(self.ok_files) + len(self.mismatched) + len(self.missing)
        if self.ok:
            out.append(f"OK: {len(self.ok_files)} files match {MANIFEST}")
        else:
            out.append(f"{len(self.mismatched)} changed, {len(self.missing)} missing of {total} files in {MANIFEST}")
        return out


def check_manifest(path: str | os.PathLike) -> ManifestReport:
    """Compare a folder with its ``SHA256SUMS``."""
    folder = _folder(path)
    manifest = folder / MANIFEST
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest}: no manifest; write one with `verify manifest --write --model {folder}`")
    expected = {}
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            digest, sep, name = line.partition("  ")
            if not sep or len(digest) != 64:
                raise ConfigError(f"{manifest}:{n}: expected '<sha256>  <file>', got {line!r}")
            expected[name.lstrip("*")] = digest
    present = {f.relative_to(folder).as_posix(): f for f in _files(folder)}
    report = ManifestReport(
        missing=[n for n in expected if n not in present], extra=[n for n in present if n not in expected]
    )
    actual = _hash_all(folder, [present[n] for n in expected if n in present])
    for name, digest in actual.items():
        (report.ok_files if digest == expected[name] else report.mismatched).append(name)
    return report


@dataclass
class TokenProblem:
    file: str
    key: str
    have: object
    want: object
    """The value to write (for a list of EOS ids: the list with the tokenizer's id added)."""
    fix: str | None
    """What to change, or None when no config edit can fix it."""


def _agrees(have, want) -> bool:
    return have == want or (isinstance(have, list) and want in have)


def check_tokenizer(path: str | os.PathLike) -> list[TokenProblem]:
    """BOS/EOS/pad ids of the tokenizer vs ``config.json`` vs ``generation_config.json``."""
    from transformers import AutoTokenizer

    from ..model.load import ModelLoadError

    folder = _folder(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder}: cannot load the tokenizer: {str(e).splitlines()[0]}") from None
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    problems = []
    gen_file = folder / "generation_config.json"
    # a missing generation_config.json counts as one with no ids: --fix writes it
    gen = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.exists() else {}
    rows = config.get("vocab_size") or len(tok)
    for key in SPECIAL:
        want = getattr(tok, key)
        if want is None:
            continue
        if want >= rows:
            problems.append(TokenProblem("tokenizer", key, want, f"< {rows}", None))
        for name, data in (("config.json", config), ("generation_config.json", gen)):
            have = data.get(key)
            if not _agrees(have, want):
                # a list of EOS ids keeps its other entries; the tokenizer's goes first
                value = [want, *have] if isinstance(have, list) else want
                problems.append(TokenProblem(name, key, have, value, f'set "{key}": {json.dumps(value)}'))
    return problems


def apply_token_fixes(path: str | os.PathLike, problems: list[TokenProblem]) -> list[str]:
    """Write the fixes of ``problems`` into the config files (each rewritten atomically); returns the files."""
    folder = _folder(path)
    unfixable = [p for p in problems if p.fix is None]
    if unfixable:
        p = unfixable[0]
        raise ConfigError(
            f"{folder}: tokenizer {p.key} {p.have} is outside the {p.want.removeprefix('< ')} embedding rows; "
            "resize the embeddings (`chinese-vicuna vocab resize`), no config edit can fix this"
        )
    edits: dict[str, dict] = {}
    for p in problems:
        edits.setdefault(p.file, {})[p.key] = p.want
    written = []
    for name, changes in edits.items():
        path_ = folder / name
        data = json.loads(path_.read_text(encoding="utf-8")) if path_.exists() else {}
        data.update(changes)
        _atomic_write(path_, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        written.append(name)
    return written
