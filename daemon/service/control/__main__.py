"""`python -m daemon.service.control > docs/control-api.json`: the OpenAPI document."""

import sys

from daemon.service.control.openapi import render

sys.stdout.write(render())
