import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseServerMessage, streamUrl } from '../../src/protocol.js';

test('parses the captured frames of docs/protocol.md', () => {
  assert.deepEqual(parseServerMessage('{"id":"my-works","offset":"1-0000000001a08a28","type":"up_to_date"}'), {
    type: 'up_to_date',
    id: 'my-works',
    offset: '1-0000000001a08a28',
  });
  const txn = parseServerMessage(
    '{"type":"txn","xid":"758","lsn":"0/1A0ABC8","offset":"1-0000000001a0abf8","changes":[{"id":"unread","table":"works","op":"delete","row":{"id":"67b92b3a","read_status":"read"}}]}',
  );
  assert.equal(txn.type, 'txn');
  if (txn.type === 'txn') {
    assert.equal(txn.xid, '758');
    assert.equal(txn.changes[0]?.op, 'delete');
  }
  assert.deepEqual(parseServerMessage('{"id":"works","reason":"truncated","type":"must_refetch"}'), {
    type: 'must_refetch',
    id: 'works',
    reason: 'truncated',
  });
  assert.deepEqual(parseServerMessage('{"expires_at":1795925993,"type":"token_refreshed"}'), {
    type: 'token_refreshed',
    expires_at: 1795925993,
  });
  assert.deepEqual(
    parseServerMessage('{"code":"invalid_where","id":"z","message":"bad","type":"error"}'),
    { type: 'error', id: 'z', code: 'invalid_where', message: 'bad' },
  );
  assert.deepEqual(parseServerMessage('{"type":"snapshot","id":"w","rows":[]}'), { type: 'snapshot', id: 'w', rows: [] });
});

test('transactions in parts: `more` parts have no offset (one they might carry is dropped); the last part has it', () => {
  const part0 = parseServerMessage('{"type":"txn","xid":"812","lsn":"0/3B2C1D0","part":0,"more":true,"changes":[]}');
  assert.deepEqual(part0, { type: 'txn', xid: '812', lsn: '0/3B2C1D0', changes: [], part: 0, more: true });
  assert.ok(!('offset' in part0));
  const stray = parseServerMessage('{"type":"txn","xid":"812","lsn":"0/3B2C1D0","offset":"1-0a","part":1,"more":true,"changes":[]}');
  assert.ok(stray.type === 'txn' && !('offset' in stray), 'an offset on a part followed by more is never taken');
  assert.deepEqual(
    parseServerMessage('{"type":"txn","xid":"812","lsn":"0/3B2C1D0","offset":"1-0000000003b41f28","part":2,"changes":[]}'),
    { type: 'txn', xid: '812', lsn: '0/3B2C1D0', changes: [], part: 2, offset: '1-0000000003b41f28' },
  );
  // A last part (or whole transaction) without its offset is malformed: it could not be resumed from.
  assert.equal(parseServerMessage('{"type":"txn","xid":"812","lsn":"0/1","part":2,"changes":[]}').type, 'unknown');
  assert.equal(parseServerMessage('{"type":"txn","xid":"812","lsn":"0/1","more":"yes","changes":[]}').type, 'unknown');
  assert.equal(parseServerMessage('{"type":"txn","xid":"812","lsn":"0/1","part":-1,"more":true,"changes":[]}').type, 'unknown');
});

test('never throws: garbage and unknown types become unknown', () => {
  for (const raw of ['', 'nope', '[]', 'null', '{"type":"future_thing"}', '{"type":"txn","xid":5}', '{"type":"snapshot","id":"w","rows":[{"no_id":1}]}',
    '{"type":"txn","xid":"1","offset":"o","changes":[{"id":"s","table":"t","op":"merge","row":{"id":"x"}}]}']) {
    assert.equal(parseServerMessage(raw).type, 'unknown', raw);
  }
});

test('stream URL: ws(s) on the same host, token as access_token', () => {
  assert.equal(streamUrl('http://127.0.0.1:8080', 'a.b.c'), 'ws://127.0.0.1:8080/v1/stream?access_token=a.b.c');
  assert.equal(streamUrl('https://sync.example.com/', 'a.b.c'), 'wss://sync.example.com/v1/stream?access_token=a.b.c');
});
