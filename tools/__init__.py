"""Tools for the project's documentation, run from the checkout (not installed with ssld):
``python -m tools.cli_reference`` writes docs/cli.md, ``mkdocs_hooks`` builds the site from the
repository's markdown, ``doc_examples`` finds the examples the tests run (tests/test_docs.py)."""
