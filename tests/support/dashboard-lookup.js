// Drives the dashboard the way a person does: waits for the aggregations
// table, picks an aggregation, types a key into the lookup box and presses
// Enter, then reports what the page shows (and any request that left the
// wagg instance: the page must need nothing external; and any answered
// with an error, such as a missing favicon).
//
// node dashboard-lookup.js BASE_URL AGGREGATION KEY SCREENSHOT.png
// (playwright-core on NODE_PATH; the browser from $WAGG_CHROMIUM.)
const { chromium } = require('playwright-core');

async function main() {
  const [base, aggregation, key, screenshot] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.WAGG_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 1000 } });
    const external = [];
    page.on('request', (request) => {
      const url = request.url();
      if (!url.startsWith(base) && !url.startsWith('data:')) external.push(url);
    });
    const failed = [];
    page.on('response', (response) => {
      if (response.status() >= 400) failed.push(`${response.status()} ${response.url()}`);
    });
    await page.goto(`${base}/`, { timeout: 20000 });
    await page.waitForSelector('#aggregations tr', { timeout: 20000 });
    await page.selectOption('#aggregation', aggregation);
    await page.fill('#key', '');
    await page.type('#key', key);
    await page.press('#key', 'Enter');
    await page.waitForFunction(
      () => document.getElementById('state').textContent.trim().startsWith('{'),
      null,
      { timeout: 20000 },
    );
    // Let the throughput chart draw a few points for the screenshot.
    await page.waitForTimeout(2500);
    await page.screenshot({ path: screenshot, fullPage: true });
    const result = {
      shown: await page.textContent('#state'),
      aggregations: await page.$$eval('#aggregations tr', (rows) => rows.length),
      legend: await page.$$eval('#legend span', (items) => items.map((i) => i.textContent)),
      external,
      failed,
    };
    console.log(JSON.stringify(result));
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
