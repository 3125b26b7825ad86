/// <reference types="vite/client" />

interface ImportMetaEnv {
  /** Base URL of the sdproxy service, e.g. "http://127.0.0.1:8000". Empty: same origin as the page. */
  readonly VITE_API_URL?: string;
}

interface ImportMeta {
  readonly env: ImportMetaEnv;
}
