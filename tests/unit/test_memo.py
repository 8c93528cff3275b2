import sqlite3

import pytest

from common.privacy import memo
from common.privacy.accountant import prv_epsilon
from common.privacy.independent import pld_epsilon


@pytest.fixture
def store(tmp_path):
    memo.keep_in(tmp_path / "accountant.sqlite")
    yield tmp_path / "accountant.sqlite"
    memo.keep_in(None)


def counted(calls: list):
    @memo.on_disk("test-square/v1")
    def square(x: float, *, offset: float = 0.0) -> float:
        calls.append(x)
        return x * x + offset

    return square


def test_a_result_is_computed_once_and_found_by_a_new_process(store):
    calls = []
    square = counted(calls)
    assert square(1.5, offset=0.25) == 2.5 and square(1.5, offset=0.25) == 2.5 and calls == [1.5]
    assert store.stat().st_mode & 0o077 == 0  # it can say the dataset's size: private to the site's account
    again = counted(calls)  # what a new process defines: nothing but the file is shared
    assert again(1.5, offset=0.25) == 2.5 and calls == [1.5]
    assert again(1.5) == 2.25 and again(2.0, offset=0.25) == 4.25 and calls == [1.5, 1.5, 2.0]  # other arguments


def test_a_function_whose_code_changed_never_gets_the_old_number(store):
    @memo.on_disk("test-square/v1")
    def square(x: float, *, offset: float = 0.0) -> float:
        return x * x + offset

    @memo.on_disk("test-square/v1")  # the same name, a fixed bug: another number for the same arguments
    def square_fixed(x: float, *, offset: float = 0.0) -> float:
        return x * x + offset + 1.0

    assert square(2.0) == 4.0 and square_fixed(2.0) == 5.0 and square(2.0) == 4.0


def test_without_a_store_nothing_is_kept(tmp_path):
    memo.keep_in(None)
    calls = []
    square = counted(calls)
    assert square(3.0) == 9.0 and square(3.0) == 9.0 and calls == [3.0, 3.0]
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_or_odd_store_is_recomputed_never_trusted(store, caplog):
    calls = []
    square = counted(calls)
    assert square(2.0) == 4.0
    with sqlite3.connect(store) as connection:  # an entry that is no number
        connection.execute("UPDATE results SET value = 'four'")
    assert square(2.0) == 4.0 and calls == [2.0, 2.0]
    store.write_bytes(b"not a database" * 100)
    assert square(2.0) == 4.0 and calls == [2.0, 2.0, 2.0]
    assert "could not be read" in caplog.text and "could not be kept" in caplog.text


def test_the_accountants_numbers_are_the_same_from_disk(store):
    history = ((1.137, 0.05, 41),)  # no other test asks: the in-memory cache above the disk has not seen it
    computed = (prv_epsilon(history, 1e-5), pld_epsilon(list(history), 1e-5))
    with sqlite3.connect(store) as connection:
        kept = dict(connection.execute("SELECT substr(function, 1, 3), value FROM results").fetchall())
    assert kept == {"prv": computed[0], "pld": computed[1]}
    assert 0 < computed[1] < computed[0] * 1.05  # the two accountants agree, as unit tests elsewhere check closely
