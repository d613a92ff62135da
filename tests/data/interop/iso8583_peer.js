// An independent ISO 8583 peer for tests/test_interop.py: the npm iso_8583 package.
// stdin: JSON {"mode": "encode", "fields": {...}, "formats": {...}} -> stdout: hex of the
// framed message (2-byte length header, as the package writes it); or
// {"mode": "decode", "hex": "..."} (framed) -> stdout: JSON of the fields the package reads.
'use strict';
const path = require('path');
const prefix = process.env.ISO8583_NPM_PREFIX;
const Iso8583 = require(path.join(prefix, 'node_modules', 'iso_8583'));

let input = '';
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const request = JSON.parse(input);
  const formats = request.formats || {};
  if (request.mode === 'encode') {
    const out = new Iso8583(request.fields, formats).getBufferMessage();
    if (out.error) { console.error(out.error); process.exit(2); }
    process.stdout.write(out.toString('hex'));
  } else {
    const out = new Iso8583(undefined, formats).getIsoJSON(Buffer.from(request.hex, 'hex'), {});
    if (out.error) { console.error(out.error); process.exit(2); }
    process.stdout.write(JSON.stringify(out));
  }
});
