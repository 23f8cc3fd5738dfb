// The npm SDK's WebSocketClientTransport against the gateway: connect, list tools, call one; prints JSON.
// Usage: node --experimental-websocket ws_client.mjs ws://127.0.0.1:PORT/<server>/ws
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { WebSocketClientTransport } from "@modelcontextprotocol/sdk/client/websocket.js";

const client = new Client({ name: "ws-node-test", version: "1" });
await client.connect(new WebSocketClientTransport(new URL(process.argv[2])));
const tools = await client.listTools();
const called = await client.callTool({ name: "get_current_time", arguments: { timezone: "UTC" } });
console.log(JSON.stringify({ version: client.getServerVersion(), tools: tools.tools.map((t) => t.name), called }));
await client.close();
