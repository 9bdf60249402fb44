"""What torch and transformers warn during validation is collected, not printed."""

import logging
import warnings

from transformers.utils import logging as transformers_logging

from launch.library_warnings import captured_warnings, write_warnings


def test_warnings_and_library_log_records_are_collected_not_printed(capfd, tmp_path) -> None:
    with captured_warnings() as lines:
        warnings.warn("a python warning", UserWarning)
        transformers_logging.get_logger("transformers.modeling_utils").warning("a transformers warning")
    assert capfd.readouterr() == ("", "")
    assert len(lines) == 2 and "UserWarning: a python warning" in lines[0], lines
    assert lines[1] == "transformers.modeling_utils: a transformers warning"
    write_warnings(lines, str(tmp_path / "logs" / "launch.log"))
    assert (tmp_path / "logs" / "launch.log").read_text().splitlines() == lines


def test_the_libraries_handlers_come_back_afterwards() -> None:
    logger = logging.getLogger("transformers")
    before = (list(logger.handlers), logger.propagate, warnings.showwarning)
    with captured_warnings():
        assert logger.handlers != before[0]
    assert (logger.handlers, logger.propagate, warnings.showwarning) == before
