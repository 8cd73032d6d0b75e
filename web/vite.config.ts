import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

// The API serves dist/ at `/`; `npm run dev` proxies the API to a running ./start.
export default defineConfig({
  plugins: [react()],
  build: { outDir: "dist", assetsDir: "assets", sourcemap: false },
  server: {
    proxy: {
      "/api": process.env.CHATQ_URL ?? "http://127.0.0.1:8080",
      "/v1": process.env.CHATQ_URL ?? "http://127.0.0.1:8080",
      "/health": process.env.CHATQ_URL ?? "http://127.0.0.1:8080",
    },
  },
});
