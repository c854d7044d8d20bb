"""Headless Chromium for the tests: a rendered HTML file (what it drew, which script errors it logged), and a notebook
run in JupyterLab started by `make lab` (what its outputs showed), driven over the Chrome DevTools protocol."""

import base64
import fcntl
import json
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def chromium() -> str | None:
    """The headless Chromium on this machine, if any."""
    return next(
        (
            path
            for name in ("chromium", "chromium-browser", "google-chrome")
            if (path := shutil.which(name))
        ),
        None,
    )


def open_in_chromium(path, wait_ms: int = 15000) -> tuple[str, list[str]]:
    """(the DOM after scripts ran, console messages) for the HTML file at `path` (or an http:// URL on this machine),
    offline."""
    target = str(path) if str(path).startswith("http://") else f"file://{path}"
    result = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            f"--virtual-time-budget={wait_ms}",
            "--proxy-server=127.0.0.1:9",
            "--dump-dom",
            target,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return result.stdout, console


def drawn_plots(dom: str) -> int:
    "The number of plotly figures that plotly.js drew into the page."
    return len(re.findall(r'class="plot-container', dom))


def script_errors(console: list[str]) -> list[str]:
    return [line for line in console if re.search(r"Uncaught|Error|Failed", line)]


# --- A notebook in JupyterLab, started by `make lab`, driven in headless Chromium over the DevTools protocol ---
REPO = Path(__file__).resolve().parents[1]
# One drawn plotly figure: plotly.js turns the figure's div into .js-plotly-plot > .plot-container > .svg-container
# holding the .main-svg layers (three per figure), so each figure is counted by its first layer.
FIGURE = ".js-plotly-plot > .plot-container > .svg-container > .main-svg:first-child"
# ... drawn by a FigureWidget's view: plotly's anywidget view draws into its own Lumino widget (div.lm-Widget.js-plotly-plot,
# in the output area or in a widget box), while a static go.Figure is drawn by JupyterLab's plotly mime renderer into
# div.jp-RenderedPlotly.js-plotly-plot.
FIGURE_WIDGET = ".js-plotly-plot.lm-Widget:not(.jp-RenderedPlotly) > .plot-container > .svg-container > .main-svg:first-child"
SLIDER = ".jupyter-widgets.widget-slider"  # an ipywidgets IntSlider / FloatSlider view
ERROR_MIME = "application/vnd.jupyter.error"
# JupyterLab's settings for the check: every cell attached to the DOM (the default windowing leaves cells out of
# view unrendered), no news, update checks or toasts.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
        "doNotDisturbMode": True,
    },
}


class LabError(RuntimeError):
    """The check could not run: the server did not start, the notebook did not open, the browser died."""


@dataclass
class LabResult:
    """What a notebook run in JupyterLab showed."""

    notebook: str  # its path relative to the server's notebook directory
    matches: int  # elements matching `wait_for` in the notebook panel when the check ended
    counts: dict[str, int]  # the same for every selector asked for (wait_for, `also`)
    finished: bool  # notebook:run-all-cells came back (every cell ran, or the run stopped at a cell that raised)
    completed: bool  # ... and reported success: no cell raised
    timed_out: bool  # `timeout` passed before the run ended with the expected elements shown
    errors: list[str]  # the text of each error output (a traceback), as "cell N: text"
    stderr: list[str]  # the text of each stderr output, as "cell N: text"
    widget_errors: list[
        str
    ]  # outputs where a widget could not be shown ("Error displaying widget...")
    exceptions: list[str]  # exceptions the page did not catch (Runtime.exceptionThrown)
    console_errors: list[str]  # console.error calls and browser log entries at level error
    console: list[str] = field(repr=False)  # every console message, "type: text"
    probe: object = None  # the value of the `probe` expression, if one was given
    screenshot: Path | None = None  # a PNG of the page when the check ended, if one was asked for
    timings: dict[str, float] = field(
        default_factory=dict
    )  # seconds: server, browser, page, run, total (this run)

    def summary(self) -> str:
        "Everything a failing assertion should show."
        lines = [
            f"{self.notebook}: {self.counts} finished={self.finished} completed={self.completed} timed_out={self.timed_out} "
            f"timings={ {k: round(v, 1) for k, v in self.timings.items()} } screenshot={self.screenshot}"
        ]
        for name in ("errors", "stderr", "widget_errors", "exceptions", "console_errors"):
            lines += [f"{name}: {item[:2000]}" for item in getattr(self, name)]
        return "\n".join(lines)


class DevTools:
    """A Chrome DevTools Protocol connection over --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-separated JSON)."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd, self.write_fd = read_fd, write_fd
        self.buffer, self.next_id, self.replies, self.events = b"", 0, {}, []

    def _pump(self, wait: float) -> None:
        if not select.select([self.read_fd], [], [], max(wait, 0))[0]:
            return
        data = os.read(self.read_fd, 1 << 20)
        if not data:
            raise LabError("chromium closed its DevTools pipe (it crashed or exited)")
        self.buffer += data
        *messages, self.buffer = self.buffer.split(b"\0")
        for raw in messages:
            message = json.loads(raw)
            if "id" in message:
                self.replies[message["id"]] = message
            else:
                self.events.append(message)
                if message.get("method") == "Page.javascriptDialogOpening":
                    # an alert / confirm / beforeunload would block the page (and every evaluation) until answered
                    self._write(
                        "Page.handleJavaScriptDialog", {"accept": True}, message.get("sessionId")
                    )

    def _write(self, method: str, params: dict | None, session: str | None) -> int:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}} | (
            {"sessionId": session} if session else {}
        )
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self.write_fd, data) :]
        return self.next_id

    def send(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = 30,
    ):
        "Send a command and wait for its reply (the events that come meanwhile are kept in `events`)."
        sent = self._write(method, params, session)
        end = time.monotonic() + timeout
        while sent not in self.replies:
            if time.monotonic() > end:
                raise LabError(f"no DevTools reply to {method} in {timeout} s")
            self._pump(end - time.monotonic())
        reply = self.replies.pop(sent)
        self.replies.clear()  # replies nobody waits for (answered dialogs)
        if "error" in reply:
            raise LabError(f"DevTools {method}: {reply['error']}")
        return reply["result"]

    def drain(self) -> None:
        "Read the events that arrived so far."
        self._pump(0)


# The notebook panel for `path` (JSON-quoted below), found among the main area's widgets.
_PANEL = "[...window.jupyterapp.shell.widgets('main')].find(w => w.context && w.context.path === {path} && w.content && w.content.model)"

_STATE = """(() => {
  if (!window.jupyterapp || !window.jupyterapp.shell) return {stage: 'loading'};
  const dialog = document.querySelector('.jp-Dialog');
  if (dialog) return {stage: 'dialog', text: dialog.innerText};
  const panel = %(panel)s;
  if (!panel) return {stage: 'no notebook'};
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const ready = panel.context.isReady && panel.sessionContext.isReady && kernel && panel.content.widgets.length > 0;
  const counts = {};
  for (const selector of %(selectors)s) counts[selector] = panel.node.querySelectorAll(selector).length;
  const run = window.__labcheck || {};
  return {stage: ready ? 'ready' : 'starting', kernel: kernel ? kernel.status : null, counts, done: !!run.done, ok: run.ok,
          failure: run.error || null};
})()"""

_RUN = """(async () => {
  const panel = %(panel)s;
  window.jupyterapp.shell.activateById(panel.id);
  window.__labcheck = {done: false};
  window.jupyterapp.commands.execute('notebook:run-all-cells').then(
    ok => { window.__labcheck = {done: true, ok: ok !== false}; },
    error => { window.__labcheck = {done: true, ok: false, error: String(error)}; });
  return true;
})()"""

# Error and stderr outputs, told apart by their model (JupyterLab renders a traceback with the stderr mime renderer:
# both are div.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]), with their text as rendered.
_OUTPUTS = """(() => {
  const panel = %(panel)s;
  const found = {errors: [], stderr: [], widget_errors: []};
  panel.content.widgets.forEach((cell, i) => {
    if (!cell.outputArea) return;
    const label = 'cell ' + i + ': ', model = cell.outputArea.model;
    for (let j = 0; j < model.length; j++) {
      const output = model.get(j), json = output.toJSON(), child = cell.outputArea.widgets[j];
      const shown = child && child.node.querySelector('.jp-OutputArea-output');
      const text = shown ? shown.innerText : JSON.stringify(json);
      if (json.output_type === 'error') found.errors.push(label + text);
      else if (json.output_type === 'stream' && json.name === 'stderr') found.stderr.push(label + text);
      else if (shown && shown.getAttribute('data-mime-type') === %(error)s) found.errors.push(label + text);
      else if (/Error displaying widget/.test(text)) found.widget_errors.push(label + text);
    }
  });
  return found;
})()"""


def _free_fd(fd: int) -> int:
    "A copy of `fd` numbered 10 or more (so that bash can move it to 3 or 4 without clobbering), the original closed."
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return copy


def _kill_group(process, grace: float) -> None:
    "SIGTERM the process group of `process` (started in a session of its own), SIGKILL what is left after `grace` s."
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            pass


def pids_mentioning(text: str) -> list[int]:
    "Processes whose command line contains `text` (our own temp dir: the kernels this server started)."
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


class JupyterLab:
    """JupyterLab started by `make lab` on a free port with its own settings, and a headless Chromium to drive it.

    Its notebook directory is the repository (make lab's --notebook-dir=.): notebooks to check live in the repository
    (throw-away ones of the tests under the git-ignored tests/_lab/). Use it as a context manager; `run(notebook)`
    opens a notebook, runs all its cells and reports what it showed. Everything is torn down on exit: kernels, server
    (the make process group), chromium, temp dirs."""

    def __init__(self, start_timeout: float = 60):
        self.notebook_dir = REPO
        self.start_timeout = start_timeout
        self.token = secrets.token_hex(16)
        self.server = self.browser = self.devtools = self.session = None
        self.timings: dict[str, float] = {}
        self.home = None

    # --- set up
    def __enter__(self):
        self.home = Path(tempfile.mkdtemp(prefix="qnwb-lab-"))
        try:
            self._launch_browser()  # chromium starts while the server does
            self._start_server()
            self._connect_browser()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _start_server(self) -> None:
        start = time.monotonic()
        config, runtime, data = (self.home / name for name in ("config", "runtime", "data"))
        settings = config / "lab" / "user-settings"
        for name, values in LAB_SETTINGS.items():
            (settings / name).parent.mkdir(parents=True, exist_ok=True)
            (settings / name).write_text(json.dumps(values))
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
        }
        # Nothing of the developer's Jupyter set-up leaks in: config, settings, workspaces, user kernels, runtime files.
        env |= {
            "JUPYTER_CONFIG_DIR": str(config),
            "JUPYTER_RUNTIME_DIR": str(runtime),
            "JUPYTER_DATA_DIR": str(data),
            "JUPYTERLAB_SETTINGS_DIR": str(settings),
            "JUPYTERLAB_WORKSPACES_DIR": str(config / "lab" / "workspaces"),
            "JUPYTER_PLATFORM_DIRS": "0",
            "PYTHONUNBUFFERED": "1",
        }
        lab_args = [
            "--no-browser",
            "--ip=127.0.0.1",
            "--port=0",
            f"--IdentityProvider.token={self.token}",
            "--LabApp.expose_app_in_browser=True",
            # offline and quiet: no news feed, no update check, no PyPI extension manager, no terminals
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            "--ServerApp.terminals_enabled=False",
        ]
        text = " ".join(shlex.quote(a) for a in lab_args)
        if "$" in text:
            raise LabError(f"make would expand '$' in LAB_ARGS: {text}")
        self.log_path = self.home / "server.log"
        with open(self.log_path, "wb") as log:
            self.server = subprocess.Popen(
                ["make", "--no-print-directory", "-C", str(REPO), "lab", f"LAB_ARGS={text}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        end = start + self.start_timeout
        while True:
            if self.server.poll() is not None:
                raise LabError(
                    f"`make lab` exited with status {self.server.returncode}:\n{self.log_tail()}"
                )
            info = next(runtime.glob("jpserver-*.json"), None) if runtime.exists() else None
            if info is not None:
                try:
                    self.url = f"http://127.0.0.1:{json.loads(info.read_text())['port']}"
                    self.api("/api/status", timeout=2)
                    break
                except (ValueError, KeyError, OSError):
                    pass
            if time.monotonic() > end:
                raise LabError(
                    f"JupyterLab did not answer /api/status within {self.start_timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        self.timings["server"] = time.monotonic() - start

    def _launch_browser(self) -> None:
        binary = chromium()
        if binary is None:
            raise LabError("no chromium on this machine")
        to_chrome, from_chrome = os.pipe(), os.pipe()
        chrome_in, my_out = _free_fd(to_chrome[0]), _free_fd(to_chrome[1])
        my_in, chrome_out = _free_fd(from_chrome[0]), _free_fd(from_chrome[1])
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            f"--user-data-dir={self.home / 'chromium'}",
            "--window-size=1400,1000",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-sync",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--mute-audio",
            # loopback is never proxied: the lab answers, anything on the internet fails at once
            "--proxy-server=127.0.0.1:9",
            # a headless page is "hidden": keep its timers and rendering at full speed
            "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows",
            "about:blank",
        ]
        with open(self.home / "chromium.log", "wb") as log:
            self.browser = subprocess.Popen(
                [
                    "bash",
                    "-c",
                    f'exec 3<&{chrome_in} 4>&{chrome_out} {chrome_in}<&- {chrome_out}>&-; exec "$@"',
                    "bash",
                    binary,
                    *flags,
                ],
                pass_fds=(chrome_in, chrome_out),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        os.close(chrome_in), os.close(chrome_out)
        self.devtools = DevTools(my_in, my_out)

    def _connect_browser(self) -> None:
        start = time.monotonic()
        target = self.devtools.send("Target.createTarget", {"url": "about:blank"}, timeout=60)[
            "targetId"
        ]
        self.session = self.devtools.send(
            "Target.attachToTarget", {"targetId": target, "flatten": True}
        )["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.page(f"{domain}.enable")
        self.timings["browser"] = (
            time.monotonic() - start
        )  # what the browser's start added to the server's

    # --- helpers
    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def api(self, path: str, method: str = "GET", timeout: float = 10):
        "A call to the server's REST API with the token; the decoded JSON reply (None when empty)."
        request = urllib.request.Request(
            self.url + path,
            method=method,
            headers={"Authorization": f"token {self.token}"},
            data=b"" if method in ("POST", "DELETE") else None,
        )
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            body = reply.read()
        return json.loads(body) if body else None

    def page(self, method: str, params: dict | None = None, timeout: float = 30):
        return self.devtools.send(method, params, self.session, timeout)

    def evaluate(self, expression: str, timeout: float = 30):
        "The value of a JavaScript expression in the page (promises awaited); exceptions raise LabError."
        result = self.page(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise LabError(
                f"in the page: {details.get('exception', {}).get('description') or details.get('text')}"
            )
        return result["result"].get("value")

    def _page_messages(self) -> tuple[list[str], list[str], list[str]]:
        "(exceptions, console errors, all console messages) logged by the page since the last call."
        self.devtools.drain()
        exceptions, errors, console = [], [], []
        events, self.devtools.events = self.devtools.events, []
        for event in events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details.get("text", "")
                exceptions.append(
                    f"{text} ({details.get('url', '')}:{details.get('lineNumber', '')})"
                )
            elif method == "Runtime.consoleAPICalled":
                text = " ".join(
                    str(a.get("value", a.get("description", a.get("type"))))
                    for a in params.get("args", [])
                )
                console.append(f"{params['type']}: {text}")
                if params["type"] in ("error", "assert"):
                    errors.append(text)
            elif method == "Page.javascriptDialogOpening":
                console.append(f"dialog ({params.get('type')}, accepted): {params.get('message')}")
            elif method == "Log.entryAdded":
                entry = params["entry"]
                console.append(
                    f"{entry['level']} ({entry['source']}): {entry['text']} {entry.get('url', '')}"
                )
                if entry["level"] == "error":
                    errors.append(f"{entry['text']} {entry.get('url', '')}".strip())
        return exceptions, errors, console

    def shutdown_kernels(self) -> None:
        "Shut down every session and kernel of the server (a notebook's kernel outlives its page)."
        for kind in ("sessions", "kernels"):
            for item in self.api(f"/api/{kind}"):
                try:
                    self.api(f"/api/{kind}/{item['id']}", method="DELETE", timeout=30)
                except urllib.error.HTTPError as e:
                    if e.code != 404:  # already gone with its session
                        raise

    # --- the check
    def run(
        self,
        notebook: Path | str,
        wait_for: str = FIGURE,
        count: int = 1,
        timeout: float = 240,
        also: dict[str, int] | None = None,
        settle: float = 30,
        probe: str | None = None,
        screenshot: Path | str | None = None,
    ) -> LabResult:
        """Open `notebook` (a path under the repository) in JupyterLab, wait for its kernel to be idle, run all cells,
        and wait until the run has ended and `count` elements of the notebook panel match the CSS selector `wait_for`
        (and each selector of `also` its count), for `settle` s at most once the run has ended (outputs render after
        the kernel is done) and `timeout` s at most from opening. The notebook is not saved; its kernel is shut down.
        `probe`: a JavaScript expression evaluated at the end with `node` bound to the notebook panel's element.
        `screenshot`: where to write a PNG of the page at the end (also when the check fails)."""
        start = time.monotonic()
        notebook = Path(notebook).resolve()
        try:
            relative = notebook.relative_to(self.notebook_dir).as_posix()
        except ValueError:
            raise ValueError(
                f"{notebook} is not under the lab's notebook directory {self.notebook_dir}"
            ) from None
        if not notebook.is_file():
            raise FileNotFoundError(notebook)
        wanted = {wait_for: count} | (also or {})
        panel = _PANEL.format(path=json.dumps(relative))
        state_js = _STATE % {"panel": panel, "selectors": json.dumps(list(wanted))}
        end = start + timeout
        self._page_messages()  # forget what earlier pages logged
        self.page(
            "Page.navigate",
            {"url": f"{self.url}/lab/tree/{urllib.parse.quote(relative)}?token={self.token}"},
        )
        state = {}
        try:
            while True:  # the page loads, the notebook opens, its kernel starts
                try:
                    state = self.evaluate(state_js, timeout=10) or {}
                except LabError as e:  # the page is between documents
                    state = {"stage": str(e)}
                if state.get("stage") == "ready" and state.get("kernel") == "idle":
                    break
                if state.get("stage") == "dialog":
                    raise LabError(
                        f"JupyterLab shows a dialog instead of running {relative}: {state['text']}"
                    )
                if state.get("kernel") == "dead":
                    raise LabError(
                        f"the kernel of {relative} died while starting:\n{self.log_tail()}"
                    )
                if time.monotonic() > end:
                    raise LabError(
                        f"{relative} did not open with an idle kernel in {timeout} s (last state {state})\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.2)
            opened = time.monotonic()
            self.evaluate(_RUN % {"panel": panel})
            ended = None
            while True:  # the cells run, their outputs render
                state = self.evaluate(state_js)
                if state.get("stage") == "dialog":
                    raise LabError(
                        f"JupyterLab shows a dialog while running {relative}: {state['text']}"
                    )
                reached = all(state["counts"][s] >= n for s, n in wanted.items())
                if state["done"]:
                    ended = ended or time.monotonic()
                    if reached or time.monotonic() - ended > settle:
                        break
                if time.monotonic() > end:
                    break
                time.sleep(0.2)
            ran = time.monotonic()
            outputs = self.evaluate(_OUTPUTS % {"panel": panel, "error": json.dumps(ERROR_MIME)})
            probed = self.evaluate(f"(node => ({probe}))({panel}.node)") if probe else None
        finally:
            if screenshot is not None:
                try:
                    png = self.page("Page.captureScreenshot", {"format": "png"}, timeout=30)["data"]
                    Path(screenshot).write_bytes(base64.b64decode(png))
                except LabError:
                    screenshot = None
            exceptions, console_errors, console = self._page_messages()
            # Leave the page unsaved (no beforeunload prompt, no stray save), then shut its kernel down.
            try:
                self.evaluate(
                    f"(() => {{ const p = {panel}; if (p) p.context.model.dirty = false; }})()",
                    timeout=5,
                )
            except LabError:
                pass
            try:
                self.page("Page.navigate", {"url": "about:blank"})
                self.shutdown_kernels()
            except (LabError, OSError):  # close() still stops every kernel with the server
                pass
        counts = state["counts"]
        return LabResult(
            notebook=relative,
            matches=counts[wait_for],
            counts=counts,
            finished=state["done"],
            completed=bool(state["done"] and state["ok"]),
            timed_out=not (state["done"] and reached) and ran > end,
            errors=outputs["errors"],
            stderr=outputs["stderr"],
            widget_errors=outputs["widget_errors"],
            exceptions=exceptions,
            console_errors=console_errors,
            console=console,
            probe=probed,
            screenshot=Path(screenshot) if screenshot is not None else None,
            timings=self.timings
            | {"page": opened - start, "run": ran - opened, "total": time.monotonic() - start},
        )

    # --- tear down
    def close(self) -> None:
        "Kernels, server, browser, temp dirs: whatever was started goes, even after a failure half-way."
        if self.server is not None and self.server.poll() is None and getattr(self, "url", None):
            try:
                self.shutdown_kernels()
                self.api("/api/shutdown", method="POST")
                self.server.wait(15)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        if self.devtools is not None:
            try:
                self.devtools.send("Browser.close", timeout=5)
                self.browser.wait(5)
            except (LabError, OSError, subprocess.TimeoutExpired):
                pass
            for fd in (self.devtools.read_fd, self.devtools.write_fd):
                os.close(fd)
            self.devtools = None
        for process in (self.browser, self.server):
            if process is not None:
                _kill_group(process, grace=5)
        if self.home is not None:
            # kernels run in sessions of their own, outside make's process group: any left (started with a
            # connection file in our runtime dir) would outlive the check
            for pid in pids_mentioning(str(self.home)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None


def run_in_jupyterlab(
    notebook_path: Path | str,
    wait_for: str = FIGURE,
    count: int = 1,
    timeout: float = 240,
    **options,
) -> LabResult:
    """Start JupyterLab with `make lab`, open the notebook (a path in the repository) in headless Chromium, run all
    its cells, wait for `count` elements matching `wait_for`, tear everything down.
    `options`: those of `JupyterLab.run` (also, settle, probe, screenshot). Raises LabError when the check cannot run;
    the returned LabResult has `timings["server"]`, the time `make lab` took to answer, besides page / run / total."""
    with JupyterLab() as lab:
        return lab.run(notebook_path, wait_for, count, timeout, **options)
