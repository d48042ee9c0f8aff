"""Assertions shared by the test packages."""


def assert_one_line(exc_info, *words):
    """The error raised (``pytest.raises(...) as exc_info``) is one line and names every word."""
    msg = str(exc_info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
