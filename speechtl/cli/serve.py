"""``speechtl serve``: a small local web service around one loaded model.

``GET /`` is one page (``serve_page.html``): upload a file or record from the microphone,
read the transcript word by word, play the audio from a word, download TXT/SRT/VTT/JSON.
``POST /api/transcribe`` (multipart ``file``, optional ``lang`` and ``format``) answers
what ``speechtl transcribe --format json`` prints for that file (or the other formats).
Built on FastAPI (Starlette) and served by uvicorn: the ``serve`` extra.

The model is loaded once; requests are transcribed one at a time (a lock: the model and
its language are shared), each upload in its own temporary folder, removed afterwards.
"""


import json
import logging
import tempfile
import threading
from pathlib import Path

from .common import start_up

logger = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("serve_page.html")
MAX_UPLOAD_MB = 100.0
FORMATS = ("json", "txt", "srt", "vtt")


def _need_serve_extra():
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart: FastAPI's form parser)
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"speechtl serve needs FastAPI, python-multipart and uvicorn ({e.name} is missing): "
                           "pip install 'speechtl[serve]'") from None


def make_app(recognizer, max_upload_bytes: int = int(MAX_UPLOAD_MB * 2**20), transcriber_kwargs: dict | None = None,
             title: str = "speechtl model"):
    """The FastAPI application around a loaded :class:`speechtl.inference.recognizer.Recognizer`;
    ``transcriber_kwargs`` go to its ``transcriber`` (chunk length, VAD)."""
    _need_serve_extra()
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

    from ..data.audio import AudioError, audio_info
    from ..inference.transcribe import Item, render

    app = FastAPI(title="speechtl", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # one request at a time: the model (and its language) is shared
    kwargs = transcriber_kwargs or {}
    limit_mb = max_upload_bytes / 2**20

    def too_large() -> JSONResponse:
        return JSONResponse({"error": f"the upload is larger than this server takes ({limit_mb:g} MB; "
                                      "speechtl serve --max-upload-mb sets it)"}, status_code=413)

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        # before the multipart parser spools the body to disk; a body without a length is
        # counted while it is copied below
        size = request.headers.get("content-length")
        if request.method == "POST" and size and size.isdigit() and int(size) > max_upload_bytes + 64 * 1024:
            return too_large()
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def page():
        html = PAGE.read_text(encoding="utf-8")
        info = {"languages": list(getattr(recognizer, "languages", [])), "language": getattr(recognizer, "language", None),
                "max_upload_mb": round(limit_mb, 2), "model": title}
        return html.replace("/*SERVER*/{}", json.dumps(info))

    @app.post("/api/transcribe")
    def transcribe(file: UploadFile = File(...), lang: str | None = Form(None), format: str = Form("json")):
        if format not in FORMATS:
            return JSONResponse({"error": f"format must be one of {', '.join(FORMATS)} (got {format!r})"}, status_code=400)
        name = Path(file.filename or "upload").name or "upload"
        with tempfile.TemporaryDirectory(prefix="speechtl-serve-") as tmp:
            path = Path(tmp) / name
            size = 0
            with open(path, "wb") as out:
                while chunk := file.file.read(1 << 20):
                    size += len(chunk)
                    if size > max_upload_bytes:
                        return too_large()
                    out.write(chunk)
            if size == 0:
                return JSONResponse({"error": f"{name}: the upload is empty"}, status_code=400)
            try:
                audio_info(path)
            except AudioError as e:
                return JSONResponse({"error": f"{name}: not audio this server can read: {e.reason}"}, status_code=400)
            with lock:
                try:
                    if lang and lang != recognizer.language:
                        recognizer.set_language(lang)
                except (ValueError, FileNotFoundError) as e:
                    return JSONResponse({"error": str(e)}, status_code=400)
                t = next(iter(recognizer.transcriber(**kwargs).run([Item(str(path), str(path))])))
            if t.error is not None:
                return JSONResponse({"error": f"{name}: {t.error}"}, status_code=400)
            t.path = name  # what the command prints for a file given by this name
            if format == "json":  # as `speechtl transcribe --format json` prints it
                return Response(json.dumps(t.to_dict(), ensure_ascii=False) + "\n", media_type="application/json")
            return PlainTextResponse(render(t, format))

    @app.post("/api/render")
    async def render_as(request: Request, format: str = "srt"):
        """A transcript (the JSON above) in another format: the page's downloads."""
        if format not in FORMATS:
            return JSONResponse({"error": f"format must be one of {', '.join(FORMATS)} (got {format!r})"}, status_code=400)
        try:
            t = transcript_from_dict(await request.json())
        except (ValueError, KeyError, TypeError) as e:
            return JSONResponse({"error": f"not a transcript: {e}"}, status_code=400)
        return PlainTextResponse(render(t, format))

    return app


def transcript_from_dict(d: dict):
    """A :class:`Transcript` back from its JSON form."""
    from ..decoding.decoders import Word
    from ..inference.transcribe import Segment, Transcript

    segments = [Segment(float(s["start"]), float(s["end"]), str(s["text"]), float(s["confidence"]),
                        [Word(str(w["word"]), float(w["start"]), float(w["end"]), float(w["confidence"])) for w in s["words"]])
                for s in d.get("segments", [])]
    return Transcript(str(d.get("path", "")), str(d.get("text", "")), float(d.get("duration", 0.0)), segments)


def cmd_serve(args) -> int:
    from .decode import vad_options

    _need_serve_extra()
    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive (got {args.max_upload_mb:g})")
    with start_up(args):
        import uvicorn

        from ..inference.recognizer import Recognizer

        rec = Recognizer.load(args.model_dir, device=args.device, lang=args.lang)
    app = make_app(rec, int(args.max_upload_mb * 2**20),
                   {"chunk_length_s": args.chunk_length_s, "vad": vad_options(args)}, title=Path(args.model_dir).resolve().name)
    print(f"speechtl serve: {args.model_dir} on http://{args.host}:{args.port}/ (Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def add_serve(sub) -> None:
    from .decode import add_vad

    s = sub.add_parser("serve", help="a local web page (and API) to try a model",
                       description="Serve MODEL_DIR on a local web page: upload a file or record from the microphone, "
                                   "read the transcript word by word (low-confidence words shaded), click a word to play "
                                   "the audio from there, download TXT/SRT/VTT/JSON. POST /api/transcribe (multipart "
                                   "'file', optional 'lang' and 'format') answers what `speechtl transcribe --format json` "
                                   "prints. Needs the 'serve' extra (FastAPI, uvicorn).")
    s.add_argument("model_dir")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "0.0.0.0 lets others on the network in)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help="larger uploads are refused (413)")
    s.add_argument("--chunk-length-s", type=float, default=30.0, help="longer audio is decoded in pieces of at most this length")
    add_vad(s)
    s.add_argument("--device", default="auto")
    s.add_argument("--lang", help="language of a model trained with mode=adapter (default: the one trained last); "
                   "requests may pick another with the 'lang' field")
    s.set_defaults(func=cmd_serve)
