#!/usr/bin/env bash
# Extra system packages some tests need (headless Chromium for the browser test).
exit 0
