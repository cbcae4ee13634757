"""The one exception type users see: a message that says what went wrong and what to do."""


class ClipScopeError(Exception):
    """A failure caused by input or environment, reported to the user as one clear sentence."""


def validation_reason(error: dict) -> str:
    """A pydantic error's sentence, without the "Value error, " pydantic puts before a validator's own."""
    return error["msg"].removeprefix("Value error, ")
