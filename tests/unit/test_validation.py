"""One pydantic error formatter: every problem on one line, named by its field, in the boundary's words."""

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spectune.validation import cli_option, one_line


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(1, ge=1)


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = 8
    top_p: float = 1.0
    inner: Inner = Inner()

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError("top_p must be in (0, 1]")
        return value

    @field_validator("inner")
    @classmethod
    def _inner(cls, value: Inner) -> Inner:
        if value.k == 2:
            raise ValueError("inner.k: 2 is even")
        return value

    @model_validator(mode="after")
    def _whole(self) -> "Spec":
        if self.max_new_tokens == 13:
            raise ValueError("13 new tokens are unlucky")
        return self


def error(data: dict) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        Spec.model_validate(data)
    return caught.value


def test_every_problem_on_one_line_named_by_its_field():
    err = error({"max_new_tokens": "x", "inner": {"k": 0, "j": 1}, "colour": "red"})
    assert one_line(err) == (
        "max_new_tokens: Input should be a valid integer, unable to parse string as an integer; "
        "inner.k: Input should be greater than or equal to 1; inner.j: unknown field; colour: unknown field"
    )
    assert "\n" not in one_line(err)


def test_a_validators_own_words_lose_pydantics_prefix_and_a_location_is_not_given_twice():
    assert one_line(error({"top_p": 2})) == "top_p: top_p must be in (0, 1]"  # prose that names the field keeps it
    assert one_line(error({"top_p": 2}), verbatim=True) == "top_p: Value error, top_p must be in (0, 1]"
    assert one_line(error({"inner": {"k": 2}})) == "inner.k: 2 is even"  # the message starts with its location


def test_a_problem_of_the_whole_input_is_named_by_root_or_stands_alone():
    err = error({"max_new_tokens": 13})
    assert one_line(err) == "13 new tokens are unlucky"
    assert one_line(err, root="file") == "file: 13 new tokens are unlucky"


def test_messages_alone_a_limit_and_cli_option_labels():
    err = error({"max_new_tokens": "x", "top_p": 0, "colour": 1})
    assert one_line(err, locations=False) == (
        "Input should be a valid integer, unable to parse string as an integer; top_p must be in (0, 1]; unknown field"
    )
    assert one_line(err, limit=1, label=cli_option) == (
        "--max-new-tokens: Input should be a valid integer, unable to parse string as an integer"
    )


def test_a_list_of_error_dicts_reads_the_same_and_repeats_are_shown_once():
    err = error({"inner": {"k": 0}, "top_p": 0})
    own = [e for e in err.errors() if e["loc"][:1] == ("inner",)]
    assert one_line(own) == "inner.k: Input should be greater than or equal to 1"
    assert one_line([*err.errors(), *err.errors()]) == one_line(err)
