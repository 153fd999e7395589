"""Sphinx configuration for greenchan's reference documentation.

Built by ``.ci/docs`` with warnings as errors (``sphinx-build -W``). Pages are
Markdown (MyST); the API pages come from the docstrings (autodoc). Why Sphinx
and not mkdocs: see README.md beside this file.
"""
import os
import sys

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList

# Document the checkout this file is in, not whatever greenchan is installed.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import greenchan  # noqa: E402
from greenchan.__main__ import describe_options  # noqa: E402
from greenchan.options import ROUTE_OPTIONS  # noqa: E402

project = "greenchan"
author = "greenchan's authors"
copyright = "greenchan's authors"
version = release = greenchan.__version__

extensions = ["sphinx.ext.autodoc", "myst_parser"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]

# MyST: ```{directive} fences, ::: fences, definition lists, and anchors for
# headings so that pages can link to a section (options.md#what-the-client-sees).
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"

html_theme = "alabaster"
html_title = f"greenchan {release}"
html_static_path: list = []
html_theme_options = {"description": "one channel for WebSocket, SSE and long-polling, on gevent"}

# The unit each kind of option's default is written in, on the options page.
_UNITS = {"seconds": " s"}


class OptionsTable(Directive):
    """``{greenchan-options}``: every server option with its default, flag, variable and meaning.

    Generated from ``greenchan.options.Options`` (defaults, and the ``#:``
    comment above each field) through the same function ``greenchan --help``
    uses, so the page, the command line and the code cannot disagree.
    """

    has_content = False

    def run(self):
        rows = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 18 10 62",
            "",
            "   * - option",
            "     - default",
            "     - what it does",
        ]
        for option in describe_options():
            default = option.default + (_UNITS.get(option.kind, "") if option.default != "none" else "")
            route = " Also per route, on ``with_channel``." if option.name in ROUTE_OPTIONS else ""
            rows += [
                f"   * - ``{option.name}``",
                "",
                f"       ``{option.flag}``, ``{option.env}``",
                f"     - ``{default}``",
                f"     - {option.description}{route}",
            ]
        container = nodes.container()
        self.state.nested_parse(StringList(rows, source="greenchan.options"), self.content_offset, container)
        return container.children


def setup(app):
    app.add_directive("greenchan-options", OptionsTable)
    return {"parallel_read_safe": True}
