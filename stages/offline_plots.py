"""`python -m stages offline-plots`: `dvc plots show` and `dvc plots diff` pages that draw with no network.

DVC's plot pages load vega, vega-lite and vega-embed from a CDN, so offline every vega plot
(the learning curves, the confusion matrix) is a blank box. DVC lets a repo replace the page
(`plots.html_template`, a page with a `{plot_divs}` slot); this writes one whose <head> holds
those three libraries inline, as one classic script bundled by vl-convert-python (a PyPI
package, pinned in pyproject.toml, so the same page comes out on every machine), and points
this clone's DVC at it.

Both the page (`.dvc/plots/offline.html`, ~900 KB, beside a `.gitignore` of `*`) and the
setting (`.dvc/config.local`) stay out of git, per clone: committing the setting without the
page would make `dvc plots` fail in every fresh clone (DVC exits 255 when the template file is
missing), and committing the page would put a generated bundle in the repo. A clone where this
has not run gets DVC's own page.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

TEMPLATE = "plots/offline.html"  # relative to .dvc/, which is where DVC resolves plots.html_template
# DVC writes its plots as vega-lite v5 specs (DVC's own page loads vega-lite 5); bundle the newest v5.
VEGA_LITE_VERSION = "5.21"

# DVC fills {refresh_tag} (auto-refresh of `dvc plots show --open`) and {plot_divs} (one <div> and
# one `vegaEmbed('#id', spec)` call per plot); {scripts} is left out, or DVC would put its CDN tags there.
# The page's inline calls run while it is parsed, so vegaEmbed must be defined above them, in <head>.
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- vega {vega} / vega-lite {vega_lite} / vega-embed {vega_embed}, bundled by vl-convert-python {vlc};
         written by `python -m stages offline-plots` -->
    <script type="text/javascript">
{bundle}
    </script>
    <style>
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")


def template_html() -> str:
    """The page, with the vega libraries inline and DVC's placeholders left for DVC to fill."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    # DVC fills the page with str.replace, and "</script" would end the inline script early.
    for text in ("</script", *PLACEHOLDERS):
        if text in bundle:
            raise RuntimeError(f"the vl-convert bundle contains {text!r}; it cannot be inlined into DVC's page")
    return PAGE.format(refresh_tag="{refresh_tag}", plot_divs="{plot_divs}", bundle=bundle,
                       vega=vl_convert.get_vega_version(), vega_lite=VEGA_LITE_VERSION,
                       vega_embed=vl_convert.get_vega_embed_version(), vlc=vl_convert.__version__)


def set_up_offline_plots(start: str | Path = ".") -> Path:
    """Write the page into the DVC repo that holds `start` and set plots.html_template in its
    local (git-ignored) config. Returns the page's path."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    from .io import write_text

    try:
        repo = Repo(str(start))
    except NotDvcRepoError:
        raise UserError(f"{Path(start).resolve()} is not in a DVC repository; run this in the project's clone") \
            from None
    try:
        page = Path(repo.dvc_dir) / TEMPLATE
        write_text(page, template_html())
        write_text(page.parent / ".gitignore", "# written by `python -m stages offline-plots`; one per clone\n*\n")
        with repo.config.edit("local") as config:
            config["plots"]["html_template"] = TEMPLATE
    finally:
        repo.close()
    return page
