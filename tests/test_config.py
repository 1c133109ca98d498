"""Settings: misspelt variables are named with the closest setting; wrong URL schemes refused."""

from __future__ import annotations

import logging

import pytest

from mesh import ConfigError, Settings


def test_a_misspelt_setting_is_warned_about_with_the_closest_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="mesh.config"):
        Settings.from_env({"MESH_AMQP_ULR": "amqp://h/", "MESH_NAMESPAC": "x"})
    assert [r.getMessage() for r in caplog.records] == [
        "MESH_AMQP_ULR is not a mesh setting; did you mean MESH_AMQP_URL?",
        "MESH_NAMESPAC is not a mesh setting; did you mean MESH_NAMESPACE?",
    ]


@pytest.mark.parametrize(
    "variable",
    [
        "MESH_BRIDGE_SERVICE_HOST",  # a Kubernetes service link
        "MESH_DEV_DIR",
        "MESH_DEVSERVICES_INSTALL",
        "MESH_RABBITMQ_NODE",
        "MESH_ID",
    ],
)
def test_variables_that_are_no_near_miss_are_left_alone(
    caplog: pytest.LogCaptureFixture, variable: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="mesh.config"):
        Settings.from_env({variable: "1"})
    assert caplog.records == []


@pytest.mark.parametrize(
    ("variable", "url", "expected"),
    [
        ("MESH_AMQP_URL", "http://127.0.0.1:5672/", "'http' is not one of amqp, amqps"),
        ("MESH_REDIS_URL", "localhost:6379", "'localhost' is not one of redis, rediss, unix"),
    ],
)
def test_a_url_with_the_wrong_scheme_is_refused(variable: str, url: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        Settings.from_env({variable: url})
    assert variable in str(caught.value)
