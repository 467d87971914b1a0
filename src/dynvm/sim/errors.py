"""xapi failures as the simulator raises them.

A failure travels on the wire as ``{"Status": "Failure", "ErrorDescription": [code, *params]}``.
The codes and parameter lists below are xapi's; where the simulator cannot know a
parameter a real host would fill in, the comment says so.
"""

from __future__ import annotations


class XapiError(Exception):
    """An xapi error: ``code`` and its parameters, all strings on the wire."""

    def __init__(self, code: str, *params: object) -> None:
        super().__init__(code, *params)
        self.code = code
        self.params = [str(p) for p in params]

    @property
    def description(self) -> list[str]:
        return [self.code, *self.params]

    def __str__(self) -> str:
        return " ".join(self.description)


def handle_invalid(cls: str, ref: str) -> XapiError:
    return XapiError("HANDLE_INVALID", cls, ref)


def uuid_invalid(cls: str, uuid: str) -> XapiError:
    return XapiError("UUID_INVALID", cls, uuid)


def bad_power_state(vm: str, expected: str, actual: str) -> XapiError:
    # xapi reports power states in lower case in this error ("halted", "running").
    return XapiError("VM_BAD_POWER_STATE", vm, expected.lower(), actual.lower())


def session_invalid(ref: str) -> XapiError:
    return XapiError("SESSION_INVALID", ref)


def method_unknown(name: str) -> XapiError:
    return XapiError("MESSAGE_METHOD_UNKNOWN", name)


def parameter_count_mismatch(name: str, expected: int, received: int) -> XapiError:
    return XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", name, expected, received)


def field_type_error(field: str) -> XapiError:
    return XapiError("FIELD_TYPE_ERROR", field)
