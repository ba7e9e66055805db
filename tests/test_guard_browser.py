"""A person in the real MLflow registry UI, against ``mlflow server --app-name churn-guard``:
headless Chromium (Debian packages ``chromium`` and ``chromium-driver``; .ci/run installs
them) driven by Selenium.

Deselect with ``-m "not chromium"``. Skipped when Chromium is missing, except in CI (the
``browser`` fixture of conftest.py: a fresh profile per test).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from guard_support import canary_verdict, gate, guard_config, guard_server, new_version, set_alias
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.chromium, pytest.mark.slow]


def _add_alias(driver, url: str, name: str, version: str, alias: str, shots: Path) -> None:
    """Open the version page, open the alias editor, type ``alias``, press Save."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 90)
    driver.get(f"{url}/#/models/{name}/versions/{version}")
    editor = "button[title='Add aliases'], button[title='Edit aliases']"  # no alias yet / some
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, editor))).click()
    field = (By.CSS_SELECTOR, "div[role='dialog'] input[role='combobox']")
    box = wait.until(ec.presence_of_element_located(field))
    box.send_keys(alias)
    box.send_keys(Keys.ENTER)
    save = "[data-component-id='mlflow.edit-aliases-modal.save-button']"
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, save))).click()
    driver.save_screenshot(str(shots / f"v{version}-saved.png"))


def test_promotion_from_the_registry_ui(browser, tmp_path, workspace) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with guard_server(tmp_path / "srv") as server:
        cfg = guard_config(workspace, server)
        client = MlflowClient(server.url, server.url)
        name = cfg.training.model_name
        v1, ungated, passed = (new_version(client, cfg) for _ in range(3))
        gate(client, cfg, v1, passed=True)
        assert set_alias(server, name, "champion", v1).status_code == 200
        gate(client, cfg, passed, passed=True)
        assert canary_verdict(cfg, passed) == "promote"
        wait = WebDriverWait(browser, 90)

        # refused: the UI shows the guard's message, the alias stays where it was
        _add_alias(browser, server.url, name, ungated, "champion", tmp_path)
        dialog = (By.CSS_SELECTOR, "div[role='dialog']")
        wait.until(ec.text_to_be_present_in_element(dialog, "rule not_gated"))
        text = browser.find_element(*dialog).text
        browser.save_screenshot(str(tmp_path / "refused.png"))
        assert f"version {ungated} of '{name}' may not become champion" in text
        assert "churn canary promote --force" in text  # how to pass it: a signed override
        assert client.get_registered_model(name).aliases["champion"] == v1

        # accepted: the canary-passed version gets the alias, the page shows it
        _add_alias(browser, server.url, name, passed, "champion", tmp_path)
        wait.until(ec.invisibility_of_element_located(dialog))
        badge = (By.CSS_SELECTOR, "[data-component-type='tag'][title='champion']")
        wait.until(ec.presence_of_element_located(badge))
        browser.save_screenshot(str(tmp_path / "accepted.png"))
        assert client.get_registered_model(name).aliases["champion"] == passed
        tags = client.get_model_version(name, passed).tags
        assert tags["promotion_rule"] == "gate_and_canary" and tags["promotion_route"] == "ui:set_alias"
