"""Fonts for plots whose labels are class names, which may be in any script: make_shards' plots
and the trainer's confusion matrix both set them up here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from matplotlib import font_manager, rcParams

# Fonts with CJK glyphs, in order of preference, when no packaged one is installed.
CJK_FAMILIES = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
    "Hiragino Sans GB",
    "Arial Unicode MS",
)


def setup_fonts(need_cjk: bool) -> str | None:
    """A font family list that (if ``need_cjk``) falls back to a CJK font glyph by glyph;
    -> that font's name, None if none was needed or found."""
    rcParams["font.family"] = ["DejaVu Sans"]
    if not need_cjk:  # loading a 16 MB CJK font costs a second; ASCII class names need none
        return None
    cjk = None
    path = packaged_cjk()
    if path is not None:
        font_manager.fontManager.addfont(str(path))
        cjk = font_manager.FontProperties(fname=str(path)).get_name()
    if cjk is None:
        installed = {f.name for f in font_manager.fontManager.ttflist}
        cjk = next((name for name in CJK_FAMILIES if name in installed), None)
    rcParams["font.family"] = ["DejaVu Sans"] + ([cjk] if cjk else [])  # per-glyph fallback
    return cjk


def packaged_cjk() -> Path | None:
    """mplfonts' Noto Sans CJK file (Latin glyphs included), found without importing the package."""
    spec = importlib.util.find_spec("mplfonts")
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "fonts" / "NotoSansCJKsc-Regular.otf"
        if path.is_file():
            return path
    return None


def font_file(need_cjk: bool) -> str:
    """One font file for text drawn without matplotlib (PIL has no per-glyph fallback): the CJK
    one where a text needs it and it is installed, else matplotlib's DejaVu Sans."""
    cjk = packaged_cjk() if need_cjk else None
    return str(cjk) if cjk else font_manager.findfont("DejaVu Sans")
