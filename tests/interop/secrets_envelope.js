#!/usr/bin/env node
// An independent implementation of the original Risoluto secret formats, with Node's crypto.
// The master key comes from the MASTER_KEY environment variable (never argv).
//
//   node secrets_envelope.js write-file PATH    stdin: JSON object {name: value} -> secrets.enc at PATH
//   node secrets_envelope.js read-file PATH     secrets.enc at PATH -> stdout: the JSON object
//   node secrets_envelope.js seal-row           stdin: value -> stdout: {"iv","authTag","ciphertext"} (no AAD,
//                                               as the original's encrypted_secrets rows)
//   node secrets_envelope.js open-row [NAME]    stdin: {"iv","authTag","ciphertext"} -> stdout: the value;
//                                               with NAME, the UTF-8 name is the associated data
"use strict";
const crypto = require("crypto");
const fs = require("fs");

function key() {
  const master = process.env.MASTER_KEY;
  if (!master) throw new Error("MASTER_KEY is not set");
  return crypto.createHash("sha256").update(master, "utf8").digest();
}

function seal(plaintext, aad) {
  const iv = crypto.randomBytes(12);
  const cipher = crypto.createCipheriv("aes-256-gcm", key(), iv);
  if (aad !== undefined) cipher.setAAD(Buffer.from(aad, "utf8"));
  const ciphertext = Buffer.concat([cipher.update(plaintext, "utf8"), cipher.final()]);
  return { iv: iv.toString("base64"), authTag: cipher.getAuthTag().toString("base64"),
           ciphertext: ciphertext.toString("base64") };
}

function open(sealed, aad) {
  const decipher = crypto.createDecipheriv("aes-256-gcm", key(), Buffer.from(sealed.iv, "base64"));
  if (aad !== undefined) decipher.setAAD(Buffer.from(aad, "utf8"));
  decipher.setAuthTag(Buffer.from(sealed.authTag, "base64"));
  return Buffer.concat([decipher.update(Buffer.from(sealed.ciphertext, "base64")), decipher.final()]).toString("utf8");
}

const stdin = () => fs.readFileSync(0, "utf8");
const [cmd, arg] = process.argv.slice(2);

if (cmd === "write-file") {
  const secrets = JSON.parse(stdin());
  const sealed = seal(JSON.stringify(secrets, null, 2));
  const envelope = { version: 1, algorithm: "aes-256-gcm", iv: sealed.iv, authTag: sealed.authTag,
                     ciphertext: sealed.ciphertext };
  fs.writeFileSync(arg, JSON.stringify(envelope, null, 2), { mode: 0o600 });
} else if (cmd === "read-file") {
  const envelope = JSON.parse(fs.readFileSync(arg, "utf8"));
  if (envelope.version !== 1 || envelope.algorithm !== "aes-256-gcm") throw new Error("unsupported envelope");
  process.stdout.write(JSON.stringify(JSON.parse(open(envelope))));
} else if (cmd === "seal-row") {
  process.stdout.write(JSON.stringify(seal(stdin())));
} else if (cmd === "open-row") {
  process.stdout.write(open(JSON.parse(stdin()), arg));
} else {
  process.stderr.write("usage: secrets_envelope.js write-file|read-file PATH | seal-row | open-row [NAME]\n");
  process.exit(2);
}
