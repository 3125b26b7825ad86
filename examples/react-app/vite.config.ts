import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

// `base: "./"` makes every asset URL relative, so the same build works when the proxy serves it
// at /app/ and when it is opened from any other path.
export default defineConfig({
  base: "./",
  plugins: [react()],
  build: {
    outDir: "dist",
    emptyOutDir: true,
  },
});
