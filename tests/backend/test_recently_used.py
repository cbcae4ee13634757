from backend.services.recently_used import RecentlyUsed


def test_a_value_is_made_once_and_the_least_recently_used_goes_first():
    made = []
    store = RecentlyUsed(2)
    make = lambda key: lambda: made.append(key) or key.upper()  # noqa: E731
    assert store.get("a", make("a")) == "A" and store.get("b", make("b")) == "B"
    assert store.get("a", make("a")) == "A" and made == ["a", "b"], "a kept value is not made again"
    store.get("c", make("c"))  # evicts b, the least recently used; a was used after it
    assert len(store) == 2
    store.get("a", make("a"))
    store.get("b", make("b"))
    assert made == ["a", "b", "c", "b"]


def test_a_failed_make_keeps_nothing():
    store = RecentlyUsed(2)

    def fail():
        raise RuntimeError("no weights here")

    try:
        store.get("a", fail)
    except RuntimeError:
        pass
    assert len(store) == 0 and store.get("a", lambda: 1) == 1


def test_find_reads_without_making_and_counts_as_a_use():
    store = RecentlyUsed(2)
    assert store.find("a") is None and len(store) == 0, "a miss makes nothing"
    store.get("a", lambda: 1)
    store.get("b", lambda: 2)
    assert store.find("a") == 1
    store.get("c", lambda: 3)  # evicts b: finding a made it the most recently used
    assert store.find("b") is None and store.find("a") == 1 and store.find("c") == 3
