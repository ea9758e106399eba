// The hand-written declarations compile, and accept a service written like the apps' (drop-in).
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const tsc = path.resolve(here, '..', '..', 'node_modules', 'typescript', 'bin', 'tsc');

test('index.d.ts type-checks a Dashboard-style subclass and the ready-made clients (tsc --noEmit)', () => {
  let out = '';
  try {
    execFileSync(process.execPath, [tsc, '-p', path.resolve(here, '..', 'types', 'tsconfig.json')], { encoding: 'utf8' });
  } catch (error) {
    out = `${error.stdout}${error.stderr}`;
  }
  assert.equal(out, '');
});
