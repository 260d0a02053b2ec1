// The server's own API as the page uses it: JSON calls, state files, the Responses event stream.
// Every failure becomes an ApiError carrying the server's message ({"error": {"message"}}), so
// the page shows the reason the server gave, never a bare status code.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    // not JSON (a proxy's page): the status line is all there is
  }
  return new ApiError(response.status, message);
}

export function conversationPath(conversationId, suffix = "") {
  return `/v1/conversations/${encodeURIComponent(conversationId)}${suffix}`;
}

export function createApi(getKey) {
  function headers(extra = {}) {
    const key = getKey();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
  }

  async function call(path, options = {}) {
    const response = await fetch(path, { ...options, headers: headers(options.headers) });
    if (!response.ok) throw await failure(response);
    return response;
  }

  return {
    async json(path, options = {}) {
      return (await call(path, options)).json();
    },

    // A state file: its bytes and the file name the server suggests.
    async download(path) {
      const response = await call(path);
      const disposition = response.headers.get("Content-Disposition") || "";
      const match = /filename="([^"]+)"/.exec(disposition);
      return { blob: await response.blob(), filename: match ? match[1] : "rxt-state.safetensors" };
    },

    async upload(path, file) {
      const response = await call(path, {
        method: "POST",
        headers: { "Content-Type": "application/octet-stream" },
        body: file,
      });
      return response.json();
    },

    // POST a streaming Responses request; yields {type: "rxt.headers", conversation} first,
    // then every server-sent event's JSON (OpenAI's Responses stream events).
    async *stream(path, body) {
      const response = await call(path, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(body),
      });
      yield { type: "rxt.headers", conversation: response.headers.get("X-RxT-Conversation-Id") };
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        // An event ends at a blank line; a chunk may end in the middle of one.
        const blocks = buffer.replace(/\r\n/g, "\n").split("\n\n");
        buffer = blocks.pop();
        for (const block of blocks) {
          const data = block
            .split("\n")
            .filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).trimStart())
            .join("\n");
          if (data && data !== "[DONE]") yield JSON.parse(data);
        }
      }
    },
  };
}
