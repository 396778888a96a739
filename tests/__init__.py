"""gantrain's tests: a regular package, so that ``tests.conftest`` is this folder's and not a top-level ``tests``
package some dependency installs (torch-fidelity 0.4.0's wheel ships one)."""
