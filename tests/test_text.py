"""The service's one duration formatter: the web pages' ETAs and the workers' time-limit message."""

import math

import pytest

from core.text import format_duration


@pytest.mark.parametrize(
    "seconds,text",
    [
        (0, "0s"),
        (8, "8s"),
        (59.4, "59s"),
        (59.6, "1m 00s"),
        (187, "3m 07s"),
        (2 * 3600 + 5 * 60 + 1, "2h 05m"),
        (86399, "23h 59m"),
        (26 * 3600, "1d 02h"),
        (7 * 24 * 3600, "7d 00h"),  # PEERAID_MAX_JOB_SECONDS' default
        (-3, "0s"),
        (None, "–"),
        ("12", "–"),
        (math.inf, "–"),
        (math.nan, "–"),
    ],
)
def test_a_duration_is_given_in_its_two_largest_units(seconds, text):
    assert format_duration(seconds) == text


def test_the_api_and_the_worker_word_durations_alike():
    from api.routes import ui
    from worker import runner

    assert ui.env.filters["duration"] is format_duration is runner.format_duration
