"""The dashboard as a person uses it: Debian's Chromium, headless, through Playwright, on a
real ``dynvm serve`` process and a simulated lab over real sockets."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from playwright.sync_api import expect

from ..sim.simtools import wait_for

LIVE_MS = 2000  # the page shows a change within 2 s
LOAD_MS = 10_000  # the first load (the service's first answers) may take longer


def test_the_page_loads_without_errors_and_shows_the_hosts_and_a_new_lease_within_2_s(dashboard):
    lab = dashboard(hosts=2)
    page = lab.page
    page.goto(lab.url + "/")
    hosts = page.locator("#hosts tbody tr")
    expect(hosts).to_have_count(2, timeout=LOAD_MS)
    expect(hosts.first).to_contain_text("sim-xen-01")
    expect(hosts.first.locator(".state-up")).to_have_text("up")
    expect(page.locator("#summary")).to_contain_text("2 of 2 hosts up")

    lab.lease("alice")
    row = page.locator("#lease-table tbody tr", has_text="alice")
    expect(row).to_be_visible(timeout=LIVE_MS)
    expect(row).to_contain_text("centos")
    expect(row).to_contain_text("made for it")
    expect(row.locator("[data-left]")).to_contain_text("h")  # the lease's time left, counting down
    assert page.url.rstrip("/") == lab.url  # no reload happened
    assert lab.errors == []
    page.goto(lab.url + "/ui")  # the same page at /ui
    expect(page.locator("#hosts tbody tr")).to_have_count(2, timeout=LOAD_MS)
    assert lab.errors == []


def test_the_release_button_releases_the_lease(dashboard):
    lab = dashboard()
    lab.lease("bob")
    page = lab.page
    page.goto(lab.url)
    row = page.locator("#lease-table tbody tr", has_text="bob")
    expect(row).to_be_visible(timeout=LOAD_MS)
    page.get_by_role("button", name="Release bob").click()  # confirm() is accepted
    expect(row).to_have_count(0, timeout=LIVE_MS)
    expect(page.locator("#status")).to_have_text("Released bob.")
    assert httpx.get(f"{lab.url}/api/v1/leases/bob", timeout=10).status_code == 404
    assert lab.errors == []


def test_the_extend_button_moves_the_expiry_an_hour_on(dashboard):
    lab = dashboard()
    lab.lease("carol", minutes=30)
    expires = httpx.get(f"{lab.url}/api/v1/leases/carol", timeout=10).json()["expires_at"]
    page = lab.page
    page.goto(lab.url)
    page.get_by_role("button", name="Extend carol by 60 minutes").click(timeout=LOAD_MS)
    expect(page.locator("#status")).to_contain_text("carol now expires at")
    after = httpx.get(f"{lab.url}/api/v1/leases/carol", timeout=10).json()["expires_at"]
    assert after == pytest.approx(expires + 3600, abs=60)  # what was left, and an hour more
    assert lab.errors == []


def test_a_host_going_down_shows_within_2_s(dashboard):
    lab = dashboard(hosts=2)
    page = lab.page
    page.goto(lab.url)
    second = page.locator("#hosts tbody tr").nth(1)
    expect(second.locator(".state-up")).to_be_visible(timeout=LOAD_MS)
    lab.lab.control(1).host_down("refuse")
    expect(second.locator(".state-down")).to_be_visible(timeout=LIVE_MS)
    expect(page.locator("#summary")).to_contain_text("1 of 2 hosts up", timeout=LIVE_MS)


def test_an_unreachable_service_shows_a_banner_and_the_last_figures(dashboard):
    lab = dashboard()
    page = lab.page
    page.goto(lab.url)
    expect(page.locator("#hosts tbody tr")).to_have_count(2, timeout=LOAD_MS)
    banner = page.locator("#banner")
    expect(banner).to_be_hidden()
    lab.serve.stop()
    expect(banner).to_be_visible(timeout=LIVE_MS + 4000)  # a refused connection fails at once; a hang in 4 s
    expect(banner).to_contain_text("unreachable")
    expect(page.locator("#hosts tbody tr")).to_have_count(2)  # what it showed stays, marked as old


def test_with_auth_on_it_asks_for_a_token_and_the_server_decides_what_it_may_do(dashboard):
    lab = dashboard(auth=True)
    alice, bob = lab.token("alice"), lab.token("bob")
    lab.lease("bobs-vm", token=bob)
    sent: list[tuple[str, str | None]] = []
    page = lab.page
    page.on("request", lambda request: sent.append((request.url, request.headers.get("authorization"))))
    page.goto(lab.url)
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible(timeout=LOAD_MS)
    expect(page.locator("#hosts tbody tr")).to_have_count(0)  # nothing shown without a token
    page.get_by_label("API token").fill(alice)
    page.get_by_role("button", name="Use token").click()
    expect(page.locator("#who")).to_have_text("signed in as alice", timeout=LIVE_MS)
    row = page.locator("#lease-table tbody tr", has_text="bobs-vm")
    expect(row).to_be_visible(timeout=LIVE_MS)
    page.get_by_role("button", name="Release bobs-vm").click()
    expect(page.locator("#status")).to_contain_text("Could not release bobs-vm")  # the server said no
    assert httpx.get(
        f"{lab.url}/api/v1/leases/bobs-vm", headers={"Authorization": f"Bearer {bob}"}, timeout=10
    ).is_success
    api_calls = [(url, header) for url, header in sent if "/api/" in url]
    assert api_calls
    assert all(alice not in url and bob not in url for url, _ in sent)  # never in a URL
    assert any(header == f"Bearer {alice}" for _, header in api_calls)
    page.get_by_role("button", name="Sign out").click()
    expect(dialog).to_be_visible(timeout=LIVE_MS)
    expect(page.locator("#lease-table tbody tr")).to_have_count(0)  # nothing shown once signed out
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_timeout(LIVE_MS)  # two refreshes refused: the dialog stays closed, the banner says why
    expect(dialog).to_be_hidden()
    expect(page.locator("#banner")).to_contain_text("Sign in with a token")


def test_it_is_usable_at_1280x800_and_on_a_phone(dashboard):
    for width, height in ((1280, 800), (390, 844)):
        lab = dashboard(viewport=(width, height))
        lab.lease(f"vm{width}")
        page = lab.page
        page.goto(lab.url)
        release = page.get_by_role("button", name=f"Release vm{width}")
        expect(release).to_be_visible(timeout=LOAD_MS)
        # the page itself never scrolls sideways; a wide table scrolls in its own box
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        release.scroll_into_view_if_needed()
        box = release.bounding_box()
        assert box is not None
        assert box["width"] >= 24
        assert box["height"] >= 24
        expect(page.get_by_role("heading", name="Hosts")).to_be_visible()
        assert lab.errors == []


def test_every_control_has_a_name_and_the_keyboard_reaches_the_actions(dashboard):
    lab = dashboard()
    lab.lease("dave")
    page = lab.page
    page.goto(lab.url)
    expect(page.get_by_role("button", name="Release dave")).to_be_visible(timeout=LOAD_MS)
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('button, input, select')]
             .filter((e) => !e.closest('[hidden], dialog:not([open])'))
             .filter((e) => !(e.getAttribute('aria-label') || e.labels?.length
                              || (e.tagName === 'BUTTON' && e.textContent.trim())))
             .map((e) => e.outerHTML)"""
    )
    assert unnamed == []
    assert page.evaluate("document.documentElement.lang") == "en"
    page.get_by_role("searchbox", name="User").focus()
    for _ in range(30):  # Tab from the filter until the release button has the focus
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.getAttribute('aria-label')") == "Release dave":
            break
    else:
        raise AssertionError("the keyboard never reached the release button")
    page.keyboard.press("Enter")  # the confirm() is accepted
    expect(page.locator("#lease-table tbody tr", has_text="dave")).to_have_count(0, timeout=LIVE_MS)
    assert page.evaluate("document.activeElement.id") == "status"  # the focus goes to what happened


CONTRAST = """(selector) => {
  const rgb = (value) => value.match(/[\\d.]+/g).slice(0, 3).map(Number);
  const luminance = ([r, g, b]) => {
    const lin = (c) => ((c /= 255) <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4);
    return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
  };
  const background = (element) => {
    for (let e = element; e; e = e.parentElement) {
      const colour = getComputedStyle(e).backgroundColor;
      if (colour !== 'rgba(0, 0, 0, 0)' && colour !== 'transparent') return rgb(colour);
    }
    return [255, 255, 255];
  };
  return [...document.querySelectorAll(selector)].map((e) => {
    const [a, b] = [luminance(rgb(getComputedStyle(e).color)), luminance(background(e))];
    return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  });
}"""


def test_text_keeps_enough_contrast_against_its_background(dashboard):
    lab = dashboard(hosts=2)
    lab.lease("erin")
    page = lab.page
    page.goto(lab.url)
    expect(page.locator("#lease-table tbody tr")).to_have_count(1, timeout=LOAD_MS)
    lab.lab.control(1).host_down("refuse")
    expect(page.locator(".state-down")).to_be_visible(timeout=LIVE_MS)
    selectors = (
        "body",
        ".banner",
        ".muted",
        ".state-up",
        ".state-down",
        ".why",
        ".legend-dynvm",
        ".legend-others",
        "th",
        "button",
    )
    for selector in selectors:
        ratios = page.evaluate(CONTRAST, selector)
        assert ratios, selector
        assert min(ratios) >= 4.5, (selector, min(ratios))  # WCAG AA for normal text


def test_the_summary_counts_in_words(dashboard):
    lab = dashboard(hosts=1)
    lab.lease("only")
    lab.page.goto(lab.url)
    expect(lab.page.locator("#summary")).to_contain_text("1 of 1 host up · 1 VM leased", timeout=LOAD_MS)


def failed_create(lab, os: str = "centos") -> None:  # type: ignore[no-untyped-def]
    """A create that fails all 3 tries; its message ends in a long word (an OpaqueRef)."""
    lab.lab.control(0).fail_next("clone", "SR_BACKEND_FAILURE_44", 3)
    body = {"os": os, "name": "broken", "wait_minutes": 1}
    assert httpx.post(f"{lab.url}/api/v1/leases", params={"wait": "true"}, json=body, timeout=60).status_code == 502


def timed_out_request(lab) -> None:  # type: ignore[no-untyped-def]
    """The host filled, then a request that waits 3 s in the queue and times out."""
    room = httpx.get(f"{lab.url}/api/v1/capacity", timeout=10).json()["centos"]
    body = {"os": "centos", "name": "fill", "count": room}
    assert httpx.post(f"{lab.url}/api/v1/leases", params={"wait": "true"}, json=body, timeout=60).is_success
    body = {"os": "centos", "name": "late", "wait_minutes": 0.05}
    assert httpx.post(f"{lab.url}/api/v1/leases", params={"wait": "true"}, json=body, timeout=60).status_code == 429


def test_refusals_and_create_failures_are_apart_and_in_words(dashboard):
    lab = dashboard(hosts=1)
    failed_create(lab)
    timed_out_request(lab)
    page = lab.page
    page.goto(lab.url)
    expect(page.locator("#failures")).to_contain_text("VM could not be made", timeout=LOAD_MS)
    expect(page.locator("#refusals")).to_contain_text("waited too long in the queue")
    expect(page.locator("#failures")).not_to_contain_text("waited too long")
    assert not re.search(r"\b(CreateFailed|QueueTimedOut)\b", page.locator("main").inner_text())


def ready_vms(lab) -> int:  # type: ignore[no-untyped-def]
    return httpx.get(f"{lab.url}/api/v1/dashboard/overview", timeout=10).json()["summary"]["ready"]


def test_the_ready_pools_and_a_long_failure_fit_at_1280_and_on_a_phone(dashboard):
    for width, height in ((1280, 800), (390, 844)):
        lab = dashboard(hosts=1, viewport=(width, height), pools="centos.ready=1")
        wait_for(lambda lab=lab: ready_vms(lab) == 1, timeout=30)  # the pool is full: no clone of its own left
        failed_create(lab, os="centos7")  # an OS without a pool: no ready VM serves it
        page = lab.page
        page.goto(lab.url)
        expect(page.locator("#pools tbody tr")).to_have_count(1, timeout=LOAD_MS)
        expect(page.locator("#failures tbody tr")).to_have_count(1, timeout=LOAD_MS)
        scroll, box = page.locator("#pools").evaluate("t => [t.parentElement.scrollWidth, t.parentElement.clientWidth]")
        assert scroll <= box  # every column shows: nothing hidden to the right
        assert page.evaluate("document.documentElement.scrollWidth") <= width  # 469 on a phone before
        assert lab.errors == []


def test_what_was_asked_with_a_token_is_never_shown_once_signed_out(dashboard):
    """A refresh asked with alice's token, answered after she signed out, is dropped: the
    page shows nothing without a token, however late the answers come."""
    lab = dashboard(auth=True)
    alice = lab.token("alice")
    lab.lease("alices-vm", token=alice)
    page = lab.page
    held: list[object] = []
    holding = [False]

    def hold_alices(route, request):  # type: ignore[no-untyped-def]
        if holding[0] and request.headers.get("authorization") == f"Bearer {alice}":
            held.append(route)  # answered only once she has signed out
        else:
            route.continue_()

    page.route("**/api/v1/**", hold_alices)
    page.goto(lab.url)
    expect(page.get_by_role("dialog")).to_be_visible(timeout=LOAD_MS)
    page.get_by_label("API token").fill(alice)
    page.get_by_role("button", name="Use token").click()
    expect(page.locator("#lease-table tbody tr", has_text="alices-vm")).to_be_visible(timeout=LIVE_MS)
    holding[0] = True
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(100)  # the next refresh is asked, and held
    assert held
    page.get_by_role("button", name="Sign out").click()
    holding[0] = False
    for route in held:
        route.continue_()  # type: ignore[attr-defined]
    page.wait_for_timeout(LIVE_MS)
    expect(page.locator("#lease-table tbody tr")).to_have_count(0)
