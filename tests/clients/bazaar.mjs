#!/usr/bin/env node
// Read tower-x402's discovery data with the official packages and print ONE JSON line (read by
// tests/discovery.rs). Input: a JSON file (argument) {routes: [{header, method, path, declare}],
// manifest}: the PAYMENT-REQUIRED header of each route's 402, the route, the config its bazaar
// was declared with (@x402/extensions' declareDiscoveryExtension input), and the manifest.
// For each route, with @x402/core 2.27.0 and @x402/extensions 2.27.0, unmodified:
//   * decodePaymentRequiredHeader + PaymentRequiredV2Schema: the 402 as clients parse it;
//   * the reference's own bazaar for the same declaration: declareDiscoveryExtension, then
//     bazaarResourceServerExtension.enrichDeclaration with the request's method, path and
//     route pattern (what @x402/express sends), deep-compared with ours;
//   * validateDiscoveryExtension (Ajv, info against schema) and validateDiscoveryExtensionSpec;
//   * extractDiscoveryInfo on the payload an official client would send (it echoes the 402's
//     resource and extensions): what a cataloguing facilitator records;
//   * each manifest item: accepts parsed by PaymentRequirementsV2Schema, its bazaar validated.
// Exit status 0 when it ran (the test asserts the results), 2 on usage or install errors.
import { createRequire } from "node:module";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { isDeepStrictEqual } from "node:util";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEPS = resolve(process.env.X402_TEST_DEPS || join(HERE, "..", "..", "target", "test-deps"));
const nodeDir = join(DEPS, "node");
if (process.argv.length !== 3) {
  console.error("usage: node bazaar.mjs INPUT.json");
  process.exit(2);
}
if (!existsSync(join(nodeDir, "node_modules"))) {
  console.error(`bazaar.mjs: packages not installed in ${nodeDir} (run scripts/install-test-deps.sh)`);
  process.exit(2);
}
const need = createRequire(join(nodeDir, "package.json"));
const { decodePaymentRequiredHeader } = need("@x402/core/http");
const { PaymentRequiredV2Schema, PaymentRequirementsV2Schema } = need("@x402/core/schemas");
const {
  declareDiscoveryExtension,
  bazaarResourceServerExtension,
  validateDiscoveryExtension,
  validateDiscoveryExtensionSpec,
  extractDiscoveryInfo,
  sanitizeResourceServiceMetadata,
} = need("@x402/extensions/bazaar");

const input = JSON.parse(readFileSync(process.argv[2], "utf8"));
const routes = input.routes.map(({ header, method, path, pattern, declare }) => {
  const pr = decodePaymentRequiredHeader(header);
  const parsed = PaymentRequiredV2Schema.safeParse(pr);
  const ours = pr.extensions?.bazaar;
  const declared = declareDiscoveryExtension(declare).bazaar;
  const reference = bazaarResourceServerExtension.enrichDeclaration(declared, {
    method,
    adapter: { getPath: () => path },
    routePattern: pattern ?? path,
  });
  const accepted = pr.accepts[0];
  // The payload the official client builds: the 402's resource and extensions, echoed.
  const payload = { x402Version: 2, resource: pr.resource, accepted, payload: {}, extensions: pr.extensions };
  const discovered = extractDiscoveryInfo(payload, accepted);
  return {
    path,
    schemaOk: parsed.success,
    sameAsReference: isDeepStrictEqual(ours, reference),
    ours,
    reference,
    valid: validateDiscoveryExtension(ours),
    spec: validateDiscoveryExtensionSpec(ours),
    service: sanitizeResourceServiceMetadata(pr.resource),
    discovered,
  };
});
const items = (input.manifest.items || []).map((item) => ({
  url: item.resource?.url,
  acceptsOk: item.accepts.every((a) => PaymentRequirementsV2Schema.safeParse(a).success),
  bazaarValid: item.extensions?.bazaar ? validateDiscoveryExtension(item.extensions.bazaar).valid : null,
}));
console.log(JSON.stringify({ routes, items }));
