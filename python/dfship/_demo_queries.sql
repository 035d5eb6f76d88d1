-- The queries of the demos (`dfship demo`, `python -m dfship demo`) over the
-- tables `trips` and `zones`, calling the UDFs of _demo_udfs.py. Each query
-- follows a title line (starting "-- title:") and ends with a semicolon.

-- title: vectorized UDF (pyarrow.compute) feeding an aggregate
SELECT city, round(avg(fare_per_km(fare, distance_km)), 3) AS avg_fare_per_km, count(*) AS trips
FROM trips GROUP BY city ORDER BY city;

-- title: per-row Python UDF as a GROUP BY key
SELECT fare_band(fare) AS band, count(*) AS trips, round(sum(fare), 2) AS revenue
FROM trips GROUP BY fare_band(fare) ORDER BY band;

-- title: UDFs in a join key and a filter
SELECT z.zone, count(*) AS long_trips FROM trips t JOIN zones z ON city_key(t.city) = z.key
WHERE is_long_trip(t.distance_km) GROUP BY z.zone ORDER BY z.zone;

-- title: Python aggregate UDF (states merged across stages) beside the built-in avg
SELECT city, round(mean_fare(fare), 3) AS mean_fare,
abs(mean_fare(fare) - avg(fare)) < 1e-9 AS equals_avg FROM trips GROUP BY city ORDER BY city;

-- title: Python window UDF per city
SELECT city, round(max(revenue), 2) AS revenue FROM (SELECT city,
running_revenue(fare) OVER (PARTITION BY city ORDER BY trip_id) AS revenue FROM trips)
GROUP BY city ORDER BY city;
