from pathlib import Path

from clipscope.config_docs import render

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_generated_from_the_current_schema():
    assert (ROOT / "docs" / "configuration.md").read_text() == render(), (
        "docs/configuration.md is stale: run `python -m clipscope.config_docs > docs/configuration.md`"
    )


def test_every_config_and_settings_field_has_a_description():
    from pydantic import BaseModel

    from clipscope import config
    from clipscope.settings import Settings

    models = [m for m in vars(config).values() if isinstance(m, type) and issubclass(m, BaseModel) and m.__module__ == config.__name__]
    for model in models + [Settings]:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
