"""The clinical loop with real parts: Orthanc (DICOMweb PACS), MONAI Label on it, OHIF in headless Chromium.

One Orthanc (``tools/pacs.py``, free loopback ports) holds the real CT example written as a DICOM
series; one MONAI Label server (``python -m tools label_app``, tiny bundles, initial weights) is
started with ``--studies <Orthanc>/dicom-web``. Over REST the automatic bundles infer on the series
(image id = Series Instance UID), a prompted bundle infers with clicks given in the series' voxels, and a
saved final label lands in Orthanc as a DICOM SEG in the study; OHIF (served by MONAI Label at
``/ohif/``) shows the study and that SEG's segments in Chromium, and a screenshot is saved.

Skips with the reason when Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``), the MONAI Label environment
(``$MONAILABEL_PYTHON``) or, for the viewer test, Chromium / chromedriver / selenium are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import REAL_CT, TOTALSEG_TO_BTCV
from tests.label_server import REPO, Server, monailabel_python
from tools import pacs

AUTOMATIC = ["ma_sam", "h_sam", "s_sam"]
PROMPTED = "med_sa_deepgrow"
SEG_NAME = "corrected"  # model_name of the saved label: the SEG's Series Description


@dataclass
class Loop:
    orthanc: pacs.Orthanc
    server: Server
    series: Path  # the series folder as uploaded
    study_uid: str
    series_uid: str
    study_id: str  # Orthanc's id of the study


def _get(url: str):
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read().decode())


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> Loop:
    """Orthanc with the real CT series and a MONAI Label server on it (both stopped after the module)."""
    try:
        pacs.find_orthanc(), pacs.find_dicomweb_plugin()
    except FileNotFoundError as e:
        pytest.skip(f"Orthanc not installed: {e}")
    python = monailabel_python()
    if python is None:
        reason = "MONAI Label environment not found: set MONAILABEL_PYTHON or create .venv-monailabel (see .ci/run)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must run the clinical loop test.")
        pytest.skip(reason)
    if not (REAL_CT / "ct.nii.gz").is_file():
        pytest.skip("real CT example absent: no data/totalsegmentator_example/ct.nii.gz")
    from shared_nets.dicom import nifti_to_dicom
    from tools.label_app import build_label_app, start_server_command

    root = tmp_path_factory.mktemp("clinical_loop")
    series = root / "ct_dicom"
    nifti_to_dicom(REAL_CT / "ct.nii.gz", series)
    orthanc = pacs.Orthanc.start(root / "pacs")
    proc = None
    try:
        up = pacs.upload_series(orthanc.url, series)
        built = build_label_app(
            root / "app", models=[*AUTOMATIC, PROMPTED], studies=orthanc.dicomweb, monailabel_python=python
        )
        port = pacs.free_port()
        command = start_server_command(built["app"], orthanc.dicomweb, built["models"], host="127.0.0.1", port=port)
        command = [python, "-m", "monailabel.main", *command[1:]]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (built["app"], str(REPO), env.get("PYTHONPATH", "")) if p)
        env["PATH"] = os.pathsep.join((str(Path(python).parent), env.get("PATH", "")))
        env.setdefault("OMP_NUM_THREADS", "1")
        # MONAI Label caches downloaded series (and their NIfTI) here instead of ~/.cache/monailabel
        env["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = str(root / "dicomweb_cache")
        log = root / "server.log"
        server = Server(
            f"http://127.0.0.1:{port}",
            Path(built["app"]),
            root / "dicomweb_cache",
            log,
            command=command,
            env=env,
            cwd=root,
        )
        proc = server
        server.start()
        yield Loop(orthanc, server, series, up["StudyInstanceUID"], up["SeriesInstanceUID"], up["study"])
    finally:
        if proc is not None:
            proc.stop()
        orthanc.stop()


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _channel_def(loop: Loop, model: str) -> dict[int, str]:
    meta = json.loads((loop.server.app / "model" / model / "configs" / "metadata.json").read_text())
    return {int(k): v for k, v in meta["network_data_format"]["outputs"]["pred"]["channel_def"].items()}


def _series_grid(loop: Loop) -> tuple[tuple[int, int, int], np.ndarray]:
    from shared_nets.dicom import check_dicom_series, series_grid

    return series_grid(check_dicom_series(loop.series))


def _label_on_series(loop: Loop, response, model: str, tmp_path: Path) -> np.ndarray:
    """The returned label map, checked to lie on the series' grid (shape and RAS affine) with known values."""
    assert response.status == 200, f"{model}: HTTP {response.status}: {response.body[:500]!r}\n{loop.server.log_tail()}"
    out = tmp_path / f"{model}_{uuid.uuid4().hex[:8]}.nii.gz"
    out.write_bytes(response.body)
    pred = nib.load(str(out))
    shape, affine = _series_grid(loop)
    assert pred.shape == shape, f"{model}: label shape {pred.shape} != series grid {shape}"
    np.testing.assert_allclose(pred.affine, affine, atol=1e-3, err_msg=f"{model}: label affine != series affine")
    arr = np.asarray(pred.dataobj)
    values = set(np.unique(arr).astype(int).tolist())
    assert values <= set(_channel_def(loop, model)), f"{model}: label values {sorted(values)} not in channel_def"
    return arr.astype(np.int64)


def _reference_on_series(loop: Loop) -> np.ndarray:
    """The example's reference organs (BTCV ids) on the series' voxel grid (index mapping through world space)."""
    ref = nib.load(str(REAL_CT / "seg.nii.gz"))
    ts = np.asarray(ref.dataobj)
    btcv = np.zeros(ts.shape, np.uint8)
    for src, dst in TOTALSEG_TO_BTCV.items():
        btcv[ts == src] = dst
    shape, affine = _series_grid(loop)
    m = np.linalg.inv(ref.affine) @ affine
    ijk = np.indices(shape).reshape(3, -1)
    src = m[:3, :3] @ ijk + m[:3, 3:]
    assert np.allclose(src, np.rint(src), atol=1e-3), "series grid is not the NIfTI grid re-ordered"
    i, j, k = np.rint(src).astype(int)
    return btcv[i, j, k].reshape(shape)


def _organ_click(label: np.ndarray, value: int) -> list[int]:
    idx = np.argwhere(label == value)
    return idx[np.argmin(((idx - idx.mean(0)) ** 2).sum(1))].astype(int).tolist()


@pytest.fixture(scope="module")
def saved_seg(loop: Loop) -> dict:
    """The reference organs saved through MONAI Label as the corrected final label of the series (once).

    MONAI Label's DICOMweb datastore writes it as a DICOM SEG (pydicom-seg) and stores it in Orthanc.
    The label values are sent as 1..N with one ``label_info`` entry (name) each: MONAI Label numbers a
    segment by its label value and names it by position, and OHIF expects segments numbered 1..N.
    """
    reference = _reference_on_series(loop)
    values = [int(v) for v in np.unique(reference) if v]
    names = _channel_def(loop, "ma_sam")
    lut = np.zeros(256, np.uint8)
    lut[values] = np.arange(1, len(values) + 1)
    _, affine = _series_grid(loop)
    path = loop.series.parent / "corrected_label.nii.gz"
    nib.save(nib.Nifti1Image(lut[reference], affine), str(path))
    params = {"label_info": [{"name": names[v], "model_name": SEG_NAME} for v in values]}
    query = urllib.parse.urlencode({"image": loop.series_uid, "tag": "final"})
    response = loop.server.request(
        "PUT", f"/datastore/label?{query}", params=params, file=path, filename="label.nii.gz", file_field="label"
    )
    assert response.status == 200, f"save label: HTTP {response.status}: {response.body[:500]!r}"
    return {"reference": reference, "names": {v: names[v] for v in values}}


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------
def test_the_series_is_in_the_pacs(loop):
    qido = _get(f"{loop.orthanc.dicomweb}/series?Modality=CT")
    assert [s["0020000E"]["Value"][0] for s in qido] == [loop.series_uid]
    assert len(_get(f"{loop.orthanc.dicomweb}/studies/{loop.study_uid}/series/{loop.series_uid}/instances")) == 30


@pytest.mark.parametrize("model", AUTOMATIC)
def test_automatic_bundle_infers_on_the_study(loop, tmp_path, model):
    arr = _label_on_series(loop, loop.server.infer(model, image=loop.series_uid), model, tmp_path)
    assert arr.any(), f"{model}: empty segmentation"


def test_prompted_bundle_infers_with_clicks_in_series_voxels(loop, tmp_path):
    reference = _reference_on_series(loop)
    liver, spleen = _organ_click(reference, 6), _organ_click(reference, 1)
    assert liver[2] != spleen[2], "test needs the two clicks on different slices"

    def infer(clicks):
        response = loop.server.infer(PROMPTED, loop.series_uid, {"foreground": clicks, "background": []})
        return _label_on_series(loop, response, PROMPTED, tmp_path)

    first = infer([liver])
    assert set(np.unique(first)) <= {0, 1}
    np.testing.assert_array_equal(first, infer([liver]), err_msg="same click, different answers")
    changed = np.argwhere(first != infer([liver, spleen]))
    assert len(changed), "an added click did not change the segmentation"
    assert np.any(changed[:, 2] == spleen[2]), f"the new click's slice {spleen[2]} did not change"


def test_saved_label_lands_in_orthanc_as_a_seg_of_the_study(loop, saved_seg, tmp_path):
    from shared_nets.dicom import read_dicom_seg

    series = _get(f"{loop.orthanc.url}/studies/{loop.study_id}/series")
    segs = [s for s in series if s["MainDicomTags"]["Modality"] == "SEG"]
    assert len(segs) == 1 and len(segs[0]["Instances"]) == 1, [s["MainDicomTags"] for s in series]
    assert segs[0]["MainDicomTags"]["SeriesDescription"] == SEG_NAME
    instance = segs[0]["Instances"][0]
    tags = _get(f"{loop.orthanc.url}/instances/{instance}/simplified-tags")
    assert tags["StudyInstanceUID"] == loop.study_uid
    assert [r["SeriesInstanceUID"] for r in tags["ReferencedSeriesSequence"]] == [loop.series_uid]
    assert [s["SegmentLabel"] for s in tags["SegmentSequence"]] == list(saved_seg["names"].values())
    seg_file = tmp_path / "seg.dcm"
    with urllib.request.urlopen(f"{loop.orthanc.url}/instances/{instance}/file", timeout=60) as r:
        seg_file.write_bytes(r.read())
    label, affine = read_dicom_seg(seg_file, loop.series, saved_seg["names"], ignore_spatial_locations=True)
    np.testing.assert_array_equal(label, saved_seg["reference"])
    np.testing.assert_allclose(affine, _series_grid(loop)[1], atol=1e-4)


# ------------------------------------------------------------------------------------------
# the viewer
# ------------------------------------------------------------------------------------------
def _chrome(tmp_path: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (test extra)")
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    if not binary or not driver:
        pytest.skip("Chromium or chromedriver not installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
                f"--user-data-dir={tmp_path / 'chrome_profile'}", "--enable-unsafe-swiftshader"):  # fmt: skip
        options.add_argument(arg)
    options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def browser(loop, tmp_path_factory):
    """One headless Chromium for the viewer tests of this module."""
    driver = _chrome(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()


def _coloured(png: bytes | Path, box: tuple[int, int, int, int]) -> int:
    """Pixels inside ``box`` (left, top, right, bottom) that are not grey: the segmentation overlay."""
    import io

    from PIL import Image

    data = png.read_bytes() if isinstance(png, Path) else png
    left, top, right, bottom = box
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)[top:bottom, left:right]
    return int(((np.abs(rgb[..., 0] - rgb[..., 1]) > 40) | (np.abs(rgb[..., 1] - rgb[..., 2]) > 40)).sum())


def _wait(condition, timeout: float = 90.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"OHIF: timed out after {timeout:.0f} s waiting for {what}")


def _severe_errors(log: list[dict]) -> list[str]:
    """Console errors, except resources on other hosts (no network here: web fonts) and the web-app manifest's
    icon, which the OHIF build in the monailabel wheel looks up at /assets/ instead of /ohif/assets/."""
    errors = []
    for entry in log:
        message = entry["message"]
        if entry["level"] != "SEVERE":
            continue
        if "Failed to load resource" in message and ("127.0.0.1" not in message or "/assets/android-chrome" in message):
            continue
        # the MONAI Label panel asks whether a training runs; MONAI Label answers 404 when none does
        if "/train/?check_if_running=true" in message and "404" in message:
            continue
        errors.append(message)
    return errors


@pytest.mark.slow  # about 40 s: Chromium starts, OHIF loads the CT and the SEG (software WebGL)
def test_ohif_shows_the_study_and_the_seg(loop, saved_seg, browser, tmp_path):
    """OHIF on the study: the CT series and the SEG are listed, the SEG loads onto the CT with its segment names."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get_log("browser")  # drop what an earlier test left
    browser.get(f"{loop.server.url}/ohif/viewer?StudyInstanceUIDs={loop.study_uid}")
    body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    _wait(lambda: SEG_NAME in body() and "converted from NIfTI" in body(), what="the study's series list")
    _wait(lambda: "I:1 (1/30)" in body(), what="the CT's first image in the viewport")
    for button in browser.find_elements(By.XPATH, "//button[contains(., 'Confirm and Hide')]"):
        button.click()
    browser.save_screenshot(str(tmp_path / "ohif_ct.png"))
    thumbnail = browser.find_element(By.XPATH, f"//*[normalize-space(text())='{SEG_NAME}']")
    ActionChains(browser).double_click(thumbnail).perform()
    yes = _wait(lambda: browser.find_elements(By.XPATH, "//button[normalize-space(.)='Yes']"), what="'open SEG?'")
    yes[0].click()
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "[data-cy='panelSegmentation-btn']"), what="panel button")
    browser.find_element(By.CSS_SELECTOR, "[data-cy='panelSegmentation-btn']").click()
    names = list(saved_seg["names"].values())
    _wait(lambda: all(n in body() for n in names), what=f"segment names {names}")
    time.sleep(1.0)  # let the overlay render before the screenshot (no event tells when it is drawn)
    shot = tmp_path / "ohif_seg.png"
    browser.save_screenshot(str(shot))
    errors = _severe_errors(browser.get_log("browser"))
    assert not errors, f"browser console errors: {errors}"
    # the SEG is drawn: coloured (non-grey) pixels in the viewport where the CT alone had none
    box = (320, 100, 1080, 700)
    before, after = _coloured(tmp_path / "ohif_ct.png", box), _coloured(shot, box)
    assert after > before + 2000, f"no segmentation overlay drawn: {before} -> {after} coloured pixels ({shot})"
    if os.environ.get("OHIF_SCREENSHOT"):  # to refresh the screenshot in docs/
        shutil.copyfile(shot, os.environ["OHIF_SCREENSHOT"])


@pytest.mark.slow  # about 40 s: OHIF's MONAI Label mode loads the CT in three views, the bundle runs
def test_ohif_monai_label_panel_runs_a_bundle(loop, browser, tmp_path):
    """OHIF's MONAI Label mode: connect the panel to the server, run MA-SAM from Auto-Segmentation; the server
    infers on the series shown and the viewer draws the returned segmentation over the CT."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    request = f"'model': 'ma_sam', 'image': '{loop.series_uid}'"
    infers_before = loop.server.log.read_text(errors="replace").count(request)
    # the panel reads its server URL from a cookie (default: port 8000 of the page's host)
    browser.get(f"{loop.server.url}/info/")
    browser.execute_script(
        "document.cookie = 'MONAILABEL_SERVER_URL=' + escape(arguments[0]) + '; path=/';", f"{loop.server.url}/"
    )
    browser.get_log("browser")
    browser.get(f"{loop.server.url}/ohif/monai-label?StudyInstanceUIDs={loop.study_uid}")
    body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    _wait(lambda: "I:16 (16/30)" in body(), what="the CT in the axial view")
    for button in browser.find_elements(By.XPATH, "//button[contains(., 'Confirm and Hide')]"):
        button.click()
    box = (290, 60, 1110, 740)  # the three views
    before = _coloured(browser.get_screenshot_as_png(), box)
    browser.find_element(By.XPATH, "//input[@id='monailabelServerURL']/following::button[1]").click()
    _wait(lambda: "Auto-Segmentation" in body(), what="the panel to connect")
    if not browser.find_elements(By.XPATH, "//button[normalize-space(.)='Run']"):
        browser.find_element(By.XPATH, "//*[normalize-space(text())='Auto-Segmentation']").click()
    run = _wait(lambda: browser.find_elements(By.XPATH, "//button[normalize-space(.)='Run']"), what="Run")[0]
    Select(run.find_element(By.XPATH, "preceding::select[1]")).select_by_visible_text("ma_sam")
    run.click()
    _wait(lambda: _coloured(browser.get_screenshot_as_png(), box) > before + 2000, 180, "the segmentation overlay")
    time.sleep(1.0)  # let the three views finish drawing before the screenshot
    shot = tmp_path / "ohif_monai_label.png"
    browser.save_screenshot(str(shot))
    errors = _severe_errors(browser.get_log("browser"))
    assert not errors, f"browser console errors: {errors}"
    infers = loop.server.log.read_text(errors="replace").count(request)
    assert infers == infers_before + 1, f"server log: {infers - infers_before} MA-SAM requests on the series"
