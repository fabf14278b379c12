#!/usr/bin/env bash
# Build dvc_plots/index.html: a `dvc plots show/diff` HTML template with vega, vega-lite
# and vega-embed inlined, so the plots render with no network (DVC's default page loads
# them from a CDN and stays blank offline). The result (~0.9 MB) is committed; rerun this
# only to change the versions. Needs npm and the npm registry.
#
#   bash scripts/offline_plots_template.sh
#   dvc plots show        # uses it through: dvc config plots.html_template ../dvc_plots/index.html
#
# The template has dvc-render's {plot_divs} placeholder and deliberately no {scripts}:
# that is where dvc-render would insert its CDN <script src=...> tags.
set -euo pipefail

cd "$(dirname "$0")/.."
VEGA=${VEGA:-5.33.1}
VEGA_LITE=${VEGA_LITE:-5.23.0}
VEGA_EMBED=${VEGA_EMBED:-6.29.0}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "vega@${VEGA}" "vega-lite@${VEGA_LITE}" "vega-embed@${VEGA_EMBED}" >/dev/null)
for pkg in vega vega-lite vega-embed; do
    mkdir -p "$tmp/$pkg"
    tar xzf "$tmp/$pkg"-[0-9]*.tgz -C "$tmp/$pkg"
done

mkdir -p dvc_plots
"$PY" - "$tmp" "$VEGA" "$VEGA_LITE" "$VEGA_EMBED" <<'EOF'
import sys
from pathlib import Path

tmp, versions = Path(sys.argv[1]), dict(zip(("vega", "vega-lite", "vega-embed"), sys.argv[2:]))
scripts = []
for pkg, version in versions.items():
    js = (tmp / pkg / "package" / "build" / f"{pkg}.min.js").read_text()
    # An inline script ends at the first "</script"; a placeholder-like string would be
    # replaced by dvc-render. Neither occurs in these builds; check rather than assume.
    for bad in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
        if bad in js:
            sys.exit(f"{pkg}.min.js contains {bad!r}; cannot inline it")
    scripts.append(f"<!-- {pkg} {version} (BSD-3-Clause), npm registry build/{pkg}.min.js -->\n"
                   f"<script>{js}</script>")
page = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots (offline)</title>
<!-- Built by scripts/offline_plots_template.sh; nothing here loads from the network. -->
""" + "\n".join(scripts) + """
<style>
body { font-family: sans-serif; }
table { border-spacing: 15px; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""
Path("dvc_plots/index.html").write_text(page)
print(f"dvc_plots/index.html: {len(page) / 1e6:.2f} MB ({', '.join(f'{k} {v}' for k, v in versions.items())})")
EOF
