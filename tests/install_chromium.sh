#!/usr/bin/env bash
# Installs Debian's chromium for the chat-page browser test (tests/test_chat_page.py).
# Best effort: it never fails its caller; without chromium that test is skipped.
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "warning: /usr/bin/chromium is missing and this is not root; the chat page test will be skipped" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "warning: no apt-get to install chromium; the chat page test will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
    echo "installed chromium: $(/usr/bin/chromium --version 2>/dev/null)"
else
    echo "warning: installing chromium failed; the chat page test will be skipped" >&2
fi
exit 0
