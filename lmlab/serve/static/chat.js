// lmlab chat page: talks to the OpenAI-compatible API of `lmlab serve` and streams replies.
// Model output is only ever written with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"), clear: $("clear"),
  system: $("system"), temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
  model: $("model"), error: $("error"), composer: $("composer"),
};
const KEY_STORE = "lmlab.apiKey";
let history = [];       // [{role, content}] of the conversation, without the system prompt
let controller = null;  // AbortController of the running request, or null when idle
let modelId = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = els.apiKey.value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = !message;
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `Request failed: ${res.status} ${res.statusText}`;
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) throw new Error(await errorMessage(res));
    const data = await res.json();
    modelId = data.data && data.data.length ? data.data[0].id : null;
    els.model.textContent = modelId || "(none)";
    showError("");
  } catch (e) {
    els.model.textContent = "(unavailable)";
    showError(e.message);
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  els.messages.appendChild(div);
  scrollDown();
  return div;
}

function scrollDown() {
  els.messages.scrollTop = els.messages.scrollHeight;
}

function numberIn(input, lo, hi, fallback, parse) {
  const v = parse(input.value);
  return Number.isFinite(v) ? Math.min(hi, Math.max(lo, v)) : fallback;
}

function setBusy(busy) {
  els.send.disabled = busy;
  els.stop.disabled = !busy;
}

// Reads an SSE body; calls onEvent(parsed JSON) for each `data:` line until `data: [DONE]`.
async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      for (const line of event.split(/\r?\n/)) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send() {
  const text = els.input.value.trim();
  if (!text || controller) return;
  showError("");
  els.input.value = "";
  const userDiv = addMessage("user", text);
  history.push({ role: "user", content: text });
  const div = addMessage("assistant", "");
  const messages = [...history];
  const system = els.system.value.trim();
  if (system) messages.unshift({ role: "system", content: system });
  const request = {
    model: modelId || undefined, messages, stream: true,
    temperature: numberIn(els.temperature, 0, 2, 0.7, parseFloat),
    max_tokens: numberIn(els.maxTokens, 1, 1e9, 256, (s) => parseInt(s, 10)),
  };
  const ctrl = (controller = new AbortController());
  setBusy(true);
  let reply = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: ctrl.signal,
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    await readEvents(res.body, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message || "stream error");
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        div.textContent = reply;
        scrollDown();
      }
      if (choice.finish_reason) div.dataset.finish = choice.finish_reason;
    });
  } catch (e) {
    if (ctrl.signal.aborted) {
      div.dataset.stopped = "true";  // Stop: keep the partial reply
    } else if (!reply) {
      // nothing came back: undo this turn and give the text back so it can be sent again
      history.pop();
      userDiv.remove();
      div.remove();
      els.input.value = text;
      showError(e.message);
    } else {
      showError(e.message);
    }
  } finally {
    if (div.isConnected) {
      history.push({ role: "assistant", content: reply });
      div.dataset.done = "true";
    }
    if (controller === ctrl) controller = null;
    setBusy(false);
    els.input.focus();
  }
}

function stop() {
  if (controller) controller.abort();
}

function clear() {
  stop();
  controller = null;
  history = [];
  els.messages.replaceChildren();
  showError("");
  setBusy(false);
  els.input.focus();
}

els.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
els.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
els.stop.addEventListener("click", stop);
els.clear.addEventListener("click", clear);
els.apiKey.value = localStorage.getItem(KEY_STORE) || "";
els.apiKey.addEventListener("change", () => {
  localStorage.setItem(KEY_STORE, els.apiKey.value.trim());
  loadModel();
});
loadModel();
els.input.focus();
