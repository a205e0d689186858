"""The two dispatchers of pycfs.protocol.rpcserver answer alike: result, unknown method,
wrong parameters, notifications; and `handle` closes what it must."""

import os

import pytest
from jsonrpcserver import Success

from fdcount import open_fd_count
from pycfs.protocol.jsonrpc import INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, Message
from pycfs.protocol.rpcserver import Call, InvalidParamsError, handle, trusted_dispatch, validating_dispatch


def _add(call: Call, a: int, b: int = 0):
    return a + b


def _add_checked(call: Call, a: int, b: int = 0):
    if a < 0:
        raise InvalidParamsError("a must not be negative")
    return a + b


DISPATCHERS = {
    "validating": validating_dispatch({"add": lambda call, a, b=0: Success(_add(call, a, b))}),
    "trusted": trusted_dispatch({"add": _add_checked}),
}


@pytest.mark.parametrize("kind", DISPATCHERS)
def test_result_and_errors(kind):
    dispatch = DISPATCHERS[kind]
    call = Call()
    assert dispatch({"jsonrpc": "2.0", "method": "add", "params": {"a": 2, "b": 3}, "id": 7}, call) == {
        "jsonrpc": "2.0", "result": 5, "id": 7}
    missing = dispatch({"jsonrpc": "2.0", "method": "nope", "id": 8}, call)
    assert missing["error"]["code"] == METHOD_NOT_FOUND and missing["id"] == 8
    wrong = dispatch({"jsonrpc": "2.0", "method": "add", "params": {"c": 1}, "id": 9}, call)
    assert wrong["error"]["code"] == INVALID_PARAMS and wrong["id"] == 9
    assert dispatch({"jsonrpc": "2.0", "method": "add", "params": {"a": 1}}, call) is None  # notification


def test_trusted_dispatch_specifics():
    dispatch = DISPATCHERS["trusted"]
    refused = dispatch({"jsonrpc": "2.0", "method": "add", "params": {"a": -1}, "id": 1}, Call())
    assert refused["error"] == {"code": INVALID_PARAMS, "message": "Invalid params: a must not be negative"}
    for bad in ({"method": "add", "id": 2}, {"jsonrpc": "2.0", "method": "add", "params": [1], "id": 2}):
        assert dispatch(bad, Call())["error"]["code"] == INVALID_REQUEST


def test_handle_closes_request_fds_and_error_response_fds():
    before = open_fd_count()

    def opens(call: Call):
        call.out_fds.append(os.open("/dev/null", os.O_RDONLY))
        raise InvalidParamsError("no")

    r, w = os.pipe()
    response, out_fds, stop = handle(trusted_dispatch({"opens": opens}), Message(
        {"jsonrpc": "2.0", "method": "opens", "id": 1, "fds": 2}, [r, w]))
    assert response["error"]["code"] == INVALID_PARAMS and out_fds == [] and not stop
    assert open_fd_count() == before
