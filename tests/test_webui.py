"""MoE-LPR from LlamaBoard, in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`)
driven by Selenium against the plain `llamafactory-cli webui`, started here on a free localhost port.

The test trains stage 1 and stage 2 of a tiny upcycled model through the UI, checks the saved outputs' freeze
rules, then checks that a user mistake shows the plugin's one-line error in the UI and starts nothing. It saves
screenshots of the moelpr panel to docs/images (shown in the README).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest
import yaml
from llamafactory_cli import CLI, REPO, free_port
from test_plugin_e2e import changed, weights

from moelpr.llamafactory_plugin.webui import RECIPE_COMMON, RECIPE_FIELDS, RECIPE_LANG_MASK

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
IMAGES = REPO / "docs" / "images"
ROUTERS = {f"model.layers.{i}.mlp.router.weight" for i in range(4)}


def test_panel_defaults_are_the_recipes():
    """The values the UI fills in when the user picks moelpr or a stage are the example recipes'."""
    fields = {"cutoff_len": "cutoff_len", "batch_size": "per_device_train_batch_size"}
    fields |= {"gradient_accumulation_steps": "gradient_accumulation_steps", "max_samples": "max_samples"}
    for stage, recipe_file in (("post_pretrain", "stage1.yaml"), ("review", "stage2.yaml")):
        recipe = yaml.safe_load((REPO / "examples" / "moelpr" / recipe_file).read_text())
        assert recipe["moelpr_stage"] == stage
        for field, key in fields.items():
            if key in recipe:
                assert str(RECIPE_FIELDS[stage][field]) == str(recipe[key]), (stage, field)
        assert float(RECIPE_COMMON["learning_rate"]) == recipe["learning_rate"]
        assert float(RECIPE_COMMON["num_train_epochs"]) == recipe["num_train_epochs"]
        assert RECIPE_COMMON["lr_scheduler_type"] == recipe["lr_scheduler_type"]
        assert RECIPE_LANG_MASK[stage] == recipe.get("generate_lang_mask", False)


@pytest.fixture
def webui(tmp_path):
    """`llamafactory-cli webui` in a fresh working directory holding data/ with the repo's registered corpora."""
    assert CLI, "llamafactory-cli is not installed"
    assert CHROMIUM and CHROMEDRIVER, (
        "the web UI test needs Chromium and its driver: apt-get install -y chromium chromium-driver "
        "(.ci/run installs them)"
    )
    shutil.copytree(REPO / "data", tmp_path / "data")
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1"}
    env |= {"GRADIO_ANALYTICS_ENABLED": "False", "BROWSER": "true"}  # no phoning home, no browser of its own
    log = (tmp_path / "webui.log").open("w")
    server = subprocess.Popen([CLI, "webui"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "webui.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "llamafactory-cli webui did not start within 180 s"
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(1)
        yield f"http://127.0.0.1:{port}", tmp_path
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    flags = "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking"
    flags += " --disable-component-update --disable-sync --window-size=1400,1000"
    for flag in flags.split():
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # On a busy machine one command may take longer than the client's default 120 s to answer.
    driver.command_executor._client_config.timeout = 600
    try:
        yield driver
    finally:
        driver.quit()


class Board:
    """LlamaBoard's components found the way a user finds them: by their (English) labels."""

    def __init__(self, driver, url: str) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        driver.get(url)
        self.wait = WebDriverWait(driver, 60, poll_frequency=0.5)
        self._output_box = None
        self.block("Finetuning method")

    def block(self, label: str):
        xpath = (
            f"//span[@data-testid='block-info' and normalize-space()='{label}']"
            "/ancestor::div[contains(concat(' ', @class, ' '), ' block ')][1]"
        )
        return self.wait.until(lambda d: next((e for e in d.find_elements("xpath", xpath) if e.is_displayed()), None))

    def field(self, label: str):
        return self.block(label).find_element("css selector", "input:not([type=range]), textarea")

    def checkbox(self, label: str):
        xpath = f"//label[span[normalize-space()='{label}']]/input[@type='checkbox']"
        return self.wait.until(lambda d: d.find_element("xpath", xpath))

    def type(self, label: str, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        field = self.field(label)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.BACKSPACE, str(text), Keys.TAB)

    def choose(self, label: str, option: str) -> None:
        """Open a dropdown and pick the option shown as ``option``; checked, since LlamaBoard refills some lists
        when they get the focus and the refill may land after the pick."""
        for attempt in range(3):
            self._pick(label, option, settle=1 + 3 * attempt)
            time.sleep(1)
            if self._chosen(label, option):
                return
        raise AssertionError(f"could not choose {option!r} in {label!r}")

    def _pick(self, label: str, option: str, settle: float) -> None:
        from selenium.webdriver.common.keys import Keys

        field = self.field(label)
        field.click()
        time.sleep(settle)  # let a refill on focus land first
        # A single choice shows its value; in a multiselect, backspace would remove one.
        if field.get_attribute("value"):
            field.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
        field.send_keys(option)  # filters the options, as a user types to find one among many
        xpath = f"//ul[contains(@class,'options')]/li[@aria-label='{option}']"
        item = self.wait.until(lambda d: d.find_element("xpath", xpath))
        # The press a click starts, sent to the option itself: LlamaBoard's notices may float over the list.
        self.driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('mousedown', {bubbles: true}))", item)
        field.send_keys(Keys.TAB)

    def _chosen(self, label: str, option: str) -> bool:
        block = self.block(label)
        tokens = [token.text.strip() for token in block.find_elements("css selector", "div.token")]
        return option in tokens or self.field(label).get_attribute("value") == option

    def remove(self, label: str, option: str) -> None:
        """Remove a chosen value of a multiselect dropdown."""
        xpath = f".//div[contains(@class,'token') and normalize-space()='{option}']//*[contains(@class,'remove')]"
        self.block(label).find_element("xpath", xpath).click()

    def open(self, accordion: str) -> None:
        xpath = f"//button[contains(@class,'label-wrap') and contains(normalize-space(), '{accordion}')]"
        header = self.wait.until(lambda d: d.find_element("xpath", xpath))
        if "open" not in header.get_attribute("class").split():
            header.click()

    def click(self, button: str) -> None:
        self.wait.until(lambda d: d.find_element("xpath", f"//button[normalize-space()='{button}']")).click()

    def output_box(self) -> str:
        """The text of LlamaBoard's output box, the Markdown below the Train tab's buttons."""
        if self._output_box is None:
            start = self.driver.find_element("xpath", "//button[normalize-space()='Start']")
            self._output_box = start.find_element("xpath", "following::div[contains(@class,'prose')][1]")
        return self._output_box.get_attribute("textContent").strip()

    def start(self, *texts: str, timeout: float = 600) -> str:
        """Click Start; the output box's text once it has changed and shows one of ``texts``."""
        from selenium.webdriver.support.ui import WebDriverWait

        before = self.output_box()
        self.click("Start")
        WebDriverWait(self.driver, 120, poll_frequency=1).until(lambda d: self.output_box() != before)
        return self.wait_for_output(*texts, timeout=timeout)

    def wait_for_output(self, *texts: str, timeout: float = 300) -> str:
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, timeout, poll_frequency=2).until(
            lambda d: any(text in self.output_box() for text in texts)
        )
        return self.output_box()

    def screenshot(self, name: str, centre_label: str | None = None, hide_notices: bool = True) -> None:
        """Save the moelpr panel, or the window scrolled to the component labelled ``centre_label``, to
        docs/images."""
        element = self.block(centre_label) if centre_label else self.driver.find_element("id", "moelpr_tab")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        toasts = "document.querySelectorAll('.toast-wrap').forEach(e => e.style.visibility = arguments[0])"
        if hide_notices:  # LlamaBoard's notices may float over the panel
            self.driver.execute_script(toasts, "hidden")
        time.sleep(0.5)
        IMAGES.mkdir(parents=True, exist_ok=True)
        if centre_label:
            self.driver.save_screenshot(str(IMAGES / name))
        else:
            element.screenshot(str(IMAGES / name))
        self.driver.execute_script(toasts, "visible")


def set_small_run(board: Board) -> None:
    """A two-step CPU run: the tiny model's settings (recipe values are for real GPUs)."""
    board.type("Cutoff length", 32)
    board.type("Batch size", 2)
    board.type("Gradient accumulation", 1)
    board.choose("Compute type", "fp32")
    board.open("Extra configurations")
    extra = {"optim": "adamw_torch", "max_steps": 2, "logging_steps": 1, "learning_rate": 1e-2}
    board.type("Extra arguments", json.dumps(extra | {"preprocessing_num_workers": 1, "seed": 7}))


def test_both_stages_and_an_error_from_the_web_ui(upcycled_llama_dir, webui, browser):
    url, workdir = webui
    saves = workdir / "saves" / "Custom" / "moelpr"
    board = Board(browser, url)
    board.choose("Model name", "Custom")
    board.type("Model path", str(upcycled_llama_dir))
    board.choose("Finetuning method", "moelpr")
    # Picking moelpr opens its panel with stage 1's recipe values and switches LlamaBoard to pre-training.
    assert board.field("MoE-LPR stage").get_attribute("value") == "post_pretrain"
    assert board.field("Stage").get_attribute("value") == "Pre-Training"
    assert board.field("Cutoff length").get_attribute("value") == "1024"
    assert board.field("Balance loss coefficient").get_attribute("value") == "0.01"
    board.choose("Dataset", "new_hu (new)")  # the picker shows each dataset's language
    board.screenshot("webui_moelpr_top.png", "Checkpoint path")

    # Stage 1.
    set_small_run(board)
    board.type("Output dir", "stage1")
    board.click("Preview command")
    preview = board.wait_for_output("llamafactory-cli train")
    for line in ("--finetuning_type moelpr", "--moelpr_stage post_pretrain", "--aux_loss_coef 0.01"):
        assert line in preview, preview
    log = board.start("Finished.", "Failed.")
    assert "Finished." in log, log
    assert "expert_share_0" in log  # the routing statistics are in the run's log
    stage1 = saves / "stage1"
    diff = changed(weights(upcycled_llama_dir), weights(stage1))
    assert all(".mlp.router." in k or ".mlp.new_experts." in k for k in diff), diff
    assert ROUTERS <= diff and any(".mlp.new_experts." in k for k in diff)
    saved = yaml.safe_load((stage1 / "training_args.yaml").read_text())
    assert (saved["moelpr_stage"], saved["aux_loss_coef"], saved["lpr_loss_coef"]) == ("post_pretrain", 0.01, 0)
    assert [e["current_steps"] for e in map(json.loads, (stage1 / "trainer_log.jsonl").open()) if "loss" in e] == [1, 2]

    # Stage 2 from the stage-1 output, picked in LlamaBoard's checkpoint list.
    # LlamaBoard lists the stage-1 output among its checkpoints; it refills that list on focus, so type the name.
    board.field("Checkpoint path").click()
    board.wait.until(lambda d: d.find_element("xpath", "//ul[contains(@class,'options')]/li[@aria-label='stage1']"))
    time.sleep(2)
    board.type("Checkpoint path", "stage1")
    time.sleep(2)
    assert board.field("Checkpoint path").get_attribute("value") == "stage1"
    board.choose("MoE-LPR stage", "review")
    assert board.field("LPR loss coefficient").get_attribute("value") == "0.1"
    assert board.checkbox("Language mask").is_selected()
    board.choose("Dataset", "old_en (old)")
    board.screenshot("webui_moelpr_stage2.png")
    set_small_run(board)
    board.type("Output dir", "stage2")
    log = board.start("Finished.", "Failed.")
    assert "Finished." in log, log
    assert "old_lang_expert0_top1_share" in log
    stage2 = saves / "stage2"
    assert changed(weights(stage1), weights(stage2)) == ROUTERS
    assert yaml.safe_load((stage2 / "training_args.yaml").read_text())["model_name_or_path"].endswith("stage1")

    # A mistake: the review stage without an old-language dataset. The UI shows the plugin's one line, no run starts.
    board.remove("Dataset", "old_en (old)")
    board.type("Output dir", "never")
    message = board.start("[moelpr] error:", "Failed.", "Finished.", timeout=120)
    assert message.startswith("[moelpr] error: The review stage trains the routers"), message
    assert "Traceback" not in message and "\n" not in message.strip()
    board.screenshot("webui_moelpr_error.png", "Output dir", hide_notices=False)
    time.sleep(3)
    assert not (saves / "never").exists()
