// Preloaded with `node --require` into servers that have no option to choose
// their listen address (server-everything): a listen() given a port but no
// host binds to 127.0.0.1 instead of every interface.
"use strict";
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const first = args[0];
  if (first !== null && typeof first === "object" && first.port !== undefined && first.host === undefined) {
    args[0] = { ...first, host: "127.0.0.1" };
  } else if ((typeof first === "number" || /^\d+$/.test(String(first))) && typeof args[1] !== "string") {
    args.splice(1, 0, "127.0.0.1");
  }
  return listen.apply(this, args);
};
