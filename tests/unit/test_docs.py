"""The README's configuration reference is the one the code generates."""

from pathlib import Path

from serving.config import reference_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_holds_the_generated_configuration_reference():
    assert reference_markdown().strip() in README.read_text()


def test_readme_names_the_commands_ci_and_users_run():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in text and "make run" in text
    assert "make test" in ci
